"""The sweep's few-step mode (`invardiff bench --model NAME --steps 8`, issue 27) and its target list: a bundled model
sampled at another step count, full compute at that count the reference, every method (ours and the peers')
calibrating at it; the budgeted search's targets up to 5x."""

from __future__ import annotations

import dataclasses
import json

import pytest
from diffusers import FluxPipeline

from invardiff.bench import peers
from invardiff.cli.main import main
from invardiff.models.sources import ModelSource


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_targets_sampling_kwargs_are_its_step_count_defaults_settings_and_guidance():
    from invardiff.bench.targets import source_target

    target = source_target(ModelSource("wan-motion"), num_inference_steps=8)
    kwargs = target.sampling_kwargs(target.load())
    # wan-motion's clip settings, its guidance 5 over the pipeline's default, the step count it was given, latents out.
    assert kwargs == {
        "num_inference_steps": 8,
        "guidance_scale": 5.0,
        "output_type": "latent",
        "height": 32,
        "width": 32,
        "num_frames": 8,
        "max_sequence_length": 8,
    }
    assert target.sampling_settings() == {
        "height": 32,
        "width": 32,
        "num_frames": 8,
        "max_sequence_length": 8,
        "guidance_scale": 5.0,
    }


def test_a_bundled_target_samples_at_the_given_step_count():
    from invardiff.bench.targets import source_target

    own = source_target(ModelSource("flux-shapes"))
    few = source_target(ModelSource("flux-shapes"), num_inference_steps=8)
    assert own.entry.num_inference_steps == 28
    assert few.entry.num_inference_steps == 8
    assert few.entry.call_kwargs("a red circle", 0)["num_inference_steps"] == 8
    # Everything else is the model's own: its examples, guidance, calibration runs.
    assert few.entry.examples == own.entry.examples and few.entry.guidance_scale == own.entry.guidance_scale
    assert few.calibration_runs() == own.calibration_runs()
    with pytest.raises(ValueError, match="own examples and settings"):
        source_target(ModelSource("flux-shapes"), num_inference_steps=8, guidance_scale=2.0)


class Calibrated(Exception):
    """Raised where the sweep would start measuring: every method has calibrated by then."""


def test_bench_at_a_few_steps_calibrates_and_evaluates_at_that_count(tmp_path, monkeypatch):
    """`bench --model flux-shapes --steps 4 --methods peers`: MagCache calibrates at 4 steps, the evaluation
    (full compute, the reference, and every point) samples at 4 steps, the peers run at their few-step settings."""
    import invardiff.bench.sweep as sweep

    steps = []
    original_call = FluxPipeline.__call__

    def recording(self, *args, **kwargs):
        steps.append(kwargs["num_inference_steps"])
        return original_call(self, *args, **kwargs)

    seen = {}

    def stop(inputs, points, *args, **kwargs):
        seen["labels"] = [point.label for point in points]
        seen["images"] = inputs.generate(inputs.load_pipeline())  # what full compute, the reference, runs
        raise Calibrated

    monkeypatch.setattr(FluxPipeline, "__call__", recording)
    monkeypatch.setattr(sweep, "run_sweep", stop)
    with pytest.raises(Calibrated):
        main(["bench", "--model", "flux-shapes", "--steps", "4", "--methods", "peers", "--out", str(tmp_path)])
    assert steps and set(steps) == {4}  # MagCache's calibration (4 runs) and the 4 evaluated images
    assert len(steps) == 8 and seen["images"].shape[0] == 4
    # Few-step settings: cache-dit's 8 warm-up steps scaled to 1 (at 4 steps it would never cache), TaylorSeer's
    # warm-up the 2 steps a first-order prediction needs.
    assert "DBCache F1B0 thr=0.2 warm-up=1" in seen["labels"]
    assert "TaylorSeer interval=2 warm-up=2" in seen["labels"]
    assert not any(label.startswith("DBCache default") for label in seen["labels"])


def test_a_few_step_sweep_has_its_own_files(tmp_path, capsys):
    """--steps on a bundled model writes (and --report-only reads) sweep-MODEL-N-steps.*, never the sweep at the
    model's own step count."""
    result = {
        "method": "dicache",
        "label": "dicache δ=0.1",
        "settings": {},
        "measured_speedup": 1.2,
        "ideal_speedup": 1.3,
        "seconds": {"full": 1.0, "point": 0.8},
        "psnr": 40.0,
        "ssim": 0.99,
        "lpips": 0.001,
        "worst": {"psnr": 38.0, "ssim": 0.98, "lpips": 0.002},
        "executed": {"cond": {"steps_computed": 3, "steps": "CCRC"}, "attention": {"computed_fraction": 0.8}},
        "rounds": 1,
    }
    (tmp_path / "sweep-flux-shapes-4-steps.jsonl").write_text(json.dumps(result) + "\n")
    argv = ["bench", "--model", "flux-shapes", "--steps", "4", "--report-only", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = (tmp_path / "sweep-flux-shapes-4-steps.md").read_text()
    assert "# Speed-quality sweep: flux-shapes-4-steps" in table and "| dicache δ=0.1 | 1.20x |" in table
    # Compared at few-step speedups (a step in two reused is already 2x): 1.3x is beyond the point's 1.2x.
    assert "| method | LPIPS @ 1.3x | PSNR @ 1.3x | LPIPS @ 1.5x |" in table
    assert not (tmp_path / "sweep-flux-shapes.md").exists()
    assert (tmp_path / "sweep-flux-shapes-4-steps.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("model", "steps", "expected"),
    [
        ("flux-shapes", None, [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]),
        ("wan-motion", None, [2.0, 2.5, 3.0, 4.0, 4.5, 5.0]),
        ("wan-motion", 8, [1.3, 1.5, 2.0, 2.5, 3.0]),
    ],
)
def test_the_search_targets_reach_5x_and_few_steps_search_low(model, steps, expected, monkeypatch):
    import invardiff.bench.bundled as bundled
    import invardiff.calibration.budget as budget
    from invardiff.bench.targets import source_target

    asked = {}

    def searched(pipe, *, num_inference_steps, speedups, window, refine, verify, **kwargs):
        asked.update(steps=num_inference_steps, speedups=speedups, window=window, refine=refine, verify=verify)
        return [], None

    monkeypatch.setattr(budget, "calibrate_budget", searched)
    target = dataclasses.replace(source_target(ModelSource(model), num_inference_steps=steps), load=lambda: None)
    assert bundled._search_points(target, "invardiff-search") == []
    # Verified on sampled error everywhere; at a few steps 4 rounds of descent on it follow.
    own = {"steps": steps or target.entry.num_inference_steps, "speedups": expected, "window": 6, "verify": True}
    assert asked == {**own, "refine": 4 if steps else 0}


@pytest.mark.parametrize(("method", "order", "fit"), [("invardiff-frontier", 1, None), ("invardiff-frontier2", 2, 20)])
@pytest.mark.parametrize(("steps", "expected"), [(None, [4.0, 4.5, 5.0]), (8, None)])
def test_the_frontier_method_searches_from_4x_with_the_4x_recipe(steps, expected, method, order, fit, monkeypatch):
    """invardiff-frontier: the targets from 4x up, reused steps extrapolated (units plain), a 12-step window and 8
    rounds of descent; invardiff-frontier2 the same, refitted at second order from a 20-step recording; a few-step
    sweep (targets below 4x) has no such point and searches nothing."""
    import invardiff.bench.bundled as bundled
    import invardiff.calibration.budget as budget
    from invardiff.bench.targets import source_target

    asked = {}

    def searched(pipe, *, speedups, search, window, refine, verify, fit_window=None, **kwargs):
        flags = (search.extrapolate_steps, search.extrapolate_units, search.step_order)
        asked.update(speedups=speedups, flags=flags, window=window, refine=refine, verify=verify, fit=fit_window)
        return [], None

    monkeypatch.setattr(budget, "calibrate_budget", searched)
    source = ModelSource("flux-shapes")
    target = dataclasses.replace(source_target(source, num_inference_steps=steps), load=lambda: None)
    assert bundled._search_points(target, method) == []
    if expected is None:
        assert asked == {}
    else:
        flags = (True, False, order)
        assert asked == {"speedups": expected, "flags": flags, "window": 12, "refine": 8, "verify": True, "fit": fit}


def test_few_step_peers_scale_their_warm_ups_and_reach_further_at_the_pipeline_kind():
    at_8 = {peer.label: peer for peer in peers.peers(peers.FEW_STEP, 8)}
    at_4 = {peer.label: peer for peer in peers.peers(peers.FEW_STEP, 4)}
    assert at_8["DBCache F1B0 thr=0.2 warm-up=2"].settings["max_warmup_steps"] == 2
    assert at_4["DBCache F1B0 thr=0.2 warm-up=1"].settings["max_warmup_steps"] == 1
    assert len(at_4) == len(at_8) - 1  # at 4 steps the fast end's explicit warm-up of 1 is the scaled one
    pipeline = {peer.label: peer for peer in peers.peers(peers.PIPELINE, 28)}
    aggressive = pipeline["MagCache thr=1 max-skip=10 retention=0.1"].settings
    assert (aggressive["max_skip_steps"], aggressive["retention_ratio"]) == (10, 0.1)
    assert pipeline["DBCache F1B0 thr=0.8 warm-up=2"].settings["max_warmup_steps"] == 2
    assert "max_warmup_steps" not in pipeline["DBCache F1B0 thr=0.8"].settings  # cache-dit's own default


def test_a_point_identical_to_full_compute_does_not_make_the_equal_speed_psnr_infinite():
    """At a few steps a peer's slow settings reuse nothing (PSNR inf); interpolating from them read inf at every
    speedup up to the next point."""
    from invardiff.bench.sweep_report import equal_speed_table

    def point(speedup, psnr, lpips):
        return {"method": "peer", "label": f"{speedup}", "measured_speedup": speedup, "psnr": psnr, "lpips": lpips}

    table = equal_speed_table("m", [point(1.0, float("inf"), 0.0), point(1.6, 28.6, 0.02)], (1.3, 1.6))
    assert "| peer | 0.0100 | 28.60 (at 1.60x) | 0.0200 | 28.60 |" in table  # LPIPS 0 at 1x still interpolates
