"""The benchmark's held-out rule: every method, ours and the peers', calibrates on the calibration cases only. The
pipeline's calls are recorded while the sweep calibrates (each call's inputs and generator seeds), and none may be an
evaluation (input, seed)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from diffusers import DiTPipeline, FluxPipeline

from invardiff.cli.main import main


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def seen_cases(kwargs: dict) -> list[tuple]:
    """The (input, seed) pairs of one pipeline call."""
    items = kwargs["class_labels"] if "class_labels" in kwargs else kwargs["prompt"]
    items = [items] if isinstance(items, str) else list(items)
    generators = kwargs.get("generator")
    generators = generators if isinstance(generators, list) else [generators] * len(items)
    return [(item, int(g.initial_seed())) for item, g in zip(items, generators, strict=True)]


@pytest.fixture
def saved_tiny_dit(tmp_path):
    from diffusers import DiTTransformer2DModel

    from invardiff.families import get_family
    from invardiff.toy_components import IdentityVAE

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip
    vae, scheduler = IdentityVAE(latent_channels=1), get_family("dit").pipeline.scheduler()
    DiTPipeline(transformer, vae, scheduler).save_pretrained(tmp_path / "tiny-dit")
    return tmp_path / "tiny-dit"


@pytest.fixture
def saved_flux_shapes(tmp_path):
    from invardiff.models import load

    load("flux-shapes").save_pretrained(tmp_path / "shapes")
    return tmp_path / "shapes"


PROMPTS = ["a red circle on the left, black background", "a blue square in the center, white background"]


@pytest.mark.parametrize("kind", ["dit", pytest.param("flux", marks=pytest.mark.slow)])
def test_no_evaluation_input_reaches_any_calibration(kind, request, tmp_path, monkeypatch):
    """Evaluated at seeds 0 and 1000, calibrated on the cases given: the budgeted search used to calibrate on the
    evaluated inputs at seed 1000 and MagCache (Flux: diffusers' CacheMixin) at seed 0."""
    import invardiff.bench.bundled as bundled
    import invardiff.bench.sweep as sweep

    path = request.getfixturevalue("saved_tiny_dit" if kind == "dit" else "saved_flux_shapes")
    pipeline_class = DiTPipeline if kind == "dit" else FluxPipeline
    items = [1, 2] if kind == "dit" else PROMPTS
    calls = {"calibration": [], "other": []}
    phase = {"now": "other"}
    original_call = pipeline_class.__call__

    @functools.wraps(original_call)
    def recording(self, *args, **kwargs):
        calls[phase["now"]] += seen_cases(kwargs)
        return original_call(self, *args, **kwargs)

    original_points = bundled.sweep_points

    def calibrating(*args, **kwargs):  # every method's calibration happens while the sweep's points are built
        phase["now"] = "calibration"
        try:
            return original_points(*args, **kwargs)
        finally:
            phase["now"] = "other"

    class Calibrated(Exception):
        """Raised where the sweep would start measuring: every method has calibrated by then."""

    def stop(inputs, *args, **kwargs):
        calls["evaluation"] = [(case["input"], case["seed"]) for case in inputs.cases]
        raise Calibrated

    monkeypatch.setattr(pipeline_class, "__call__", recording)
    monkeypatch.setattr(bundled, "sweep_points", calibrating)
    monkeypatch.setattr(sweep, "run_sweep", stop)
    calibration = [{"input": items[0], "seed": 7}, {"input": items[1], "seed": 8}]
    (tmp_path / "calibration.json").write_text(json.dumps(calibration))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    evaluation = [(item, seed) for seed in (0, 1000) for item in items]  # the seeds a calibration used to take
    inputs = ["--classes", "1,2"] if kind == "dit" else ["--prompts", str(tmp_path / "prompts.txt")]
    argv = ["bench", "--pipeline", str(path), *inputs, "--seeds", "0,1000", "--steps", "6", "--rounds", "1"]
    argv += ["--calibration-cases", str(tmp_path / "calibration.json"), "--out", str(tmp_path / "s")]
    with pytest.raises(Calibrated):  # ours (presets, the budgeted search) and the peers (MagCache calibrates)
        main([*argv, "--methods", "invardiff", "invardiff-search", "peers"])
    assert sorted(calls["evaluation"]) == sorted(evaluation)
    assert set(calls["calibration"]) == {(items[0], 7), (items[1], 8)}  # every method, the calibration cases only


def test_an_evaluation_case_among_the_calibration_cases_is_refused(saved_tiny_dit, tmp_path, capsys):
    (tmp_path / "calibration.json").write_text(json.dumps([{"input": 1, "seed": 0}]))
    argv = ["bench", "--pipeline", str(saved_tiny_dit), "--classes", "1,2", "--steps", "8", "--methods", "dicache"]
    code = main([*argv, "--calibration-cases", str(tmp_path / "calibration.json"), "--out", str(tmp_path / "s")])
    assert code == 2
    assert "Evaluation inputs [(1, 0)] are also calibration runs" in capsys.readouterr().err


def test_budget_calibration_guidance_is_the_same_in_the_cli_the_library_and_the_sweep(
    saved_tiny_dit, tmp_path, monkeypatch
):
    """Without a guidance scale, a budgeted calibration samples at the pipeline's sampling guidance everywhere
    (DiTPipeline's default, 4.0), not at the official threshold calibration's 1."""
    from invardiff.bench.bundled import _search_points
    from invardiff.bench.targets import source_target
    from invardiff.calibration.budget import calibrate_budget
    from invardiff.models.sources import ModelSource

    guidance = {"cli": set(), "library": set(), "sweep": set()}
    where = {"now": "cli"}
    original_call = DiTPipeline.__call__

    @functools.wraps(original_call)
    def recording(self, *args, **kwargs):
        guidance[where["now"]].add(kwargs.get("guidance_scale", 4.0))
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(DiTPipeline, "__call__", recording)
    argv = ["calibrate", "--pipeline", str(saved_tiny_dit), "--classes", "1,2", "--steps", "8", "--budget", "1.5"]
    assert main([*argv, "-o", str(tmp_path / "plan.json")]) == 0
    where["now"] = "library"
    source = ModelSource(pipeline=str(saved_tiny_dit))
    calibrate_budget(source.load(), num_inference_steps=8, cases=[(1, 0)], speedups=[1.5])
    where["now"] = "sweep"
    _search_points(source_target(source, [1, 2], 8), "invardiff-search")
    assert guidance == {"cli": {4.0}, "library": {4.0}, "sweep": {4.0}}
