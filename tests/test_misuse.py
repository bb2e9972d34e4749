"""The misuse cases of issue 25 item 6 that used to hang or end in a traceback: each is now refused up front with
one line (CLI: exit status 2) naming what was expected and what to do."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_cli_errors import one_error_line, run
from test_extrapolation import T, toy, with_coefficients
from test_resample import plan_28
from test_search import stats_from

from invardiff import CachePlan
from invardiff.plan import PlanError
from invardiff.plan_transforms import resample_plan

from helpers import facts_for, plan_from_bits


def test_resampling_beyond_the_training_timesteps_is_refused_before_the_work(tmp_path, capsys):
    from invardiff.plan_transforms import MAX_RESAMPLE_STEPS

    plan = plan_28()
    assert resample_plan(plan, MAX_RESAMPLE_STEPS).num_inference_steps == 1000  # the bound itself is allowed
    with pytest.raises(ValueError, match="from 3 to 1000"):
        resample_plan(plan, MAX_RESAMPLE_STEPS + 1)
    plan.save(tmp_path / "p.json")
    # 10,000,000 steps ran for 4 minutes and 5 GB before this bound; the refusal comes from the library's check.
    code, err = run(["resample-plan", str(tmp_path / "p.json"), "--steps", "10000000", "-o", str(tmp_path / "o.json")],
                    capsys)  # fmt: skip
    assert code == 2 and "num_steps must be an integer from 3 to 1000" in one_error_line(err)
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("coefficient", [1e300, -1001.0, float("nan"), float("inf")])
def test_the_loader_bounds_extrapolation_coefficients(coefficient, tmp_path, capsys):
    from invardiff.plan_extrapolation import MAX_COEFFICIENT

    plan = plan_from_bits(facts_for(toy(), "toy"), "00110")
    data = with_coefficients(plan, steps=[0.0, 0.0, MAX_COEFFICIENT, -MAX_COEFFICIENT, 0.0]).to_dict()
    assert CachePlan.from_dict(data).step_extrapolation[2] == 1000.0  # the bound itself loads
    data["step_extrapolation"][2] = coefficient
    with pytest.raises(PlanError, match="step_extrapolation must hold (finite numbers|coefficients from -1000 to 1)"):
        CachePlan.from_dict(data)
    units = {"blocks": {"attn": [[0.0, 0.0]] * T, "ff": [[0.0, 0.0]] * T}}
    data["step_extrapolation"][2], data["unit_extrapolation"] = 0.0, units
    data["module_reuse"]["blocks"]["ff"] = ["00", "00", "00", "00", "11"]  # ff reused at the executed step 4
    assert CachePlan.from_dict(data).unit_extrapolation is not None
    units["blocks"]["ff"][4] = [0.0, coefficient]
    with pytest.raises(PlanError, match=r"unit_extrapolation\.blocks\.ff must hold"):
        CachePlan.from_dict(data)
    (tmp_path / "p.json").write_text(json.dumps(data))  # the CLI: one line, exit 2 (inspect reads the plan)
    code, err = run(["inspect", str(tmp_path / "p.json")], capsys)
    says = "unit_extrapolation.blocks.ff must hold" if abs(coefficient) < float("inf") else "which is not JSON"
    assert code == 2 and says in one_error_line(err)


def test_the_fit_clips_to_the_bound_and_never_errs_more_than_plain_reuse():
    from invardiff.plan_extrapolation import MAX_COEFFICIENT

    # f_p and f_a differ by 1e-6 and f_t is 1 further: the least-squares c = 1 / 1e-6 = 1e6, clipped to 1000, whose
    # squared error (1 - 1000 * 1e-6)^2 = 0.998001 is below plain reuse's 1.
    h = np.array([[[0.0], [1e-6], [1e-6 + 1.0]]])
    stats = stats_from({"step": h, "blocks.0.attn": h, "blocks.0.ff": h}, window=2)
    coefficient, squared = stats.fit("step", 0, 1, 2)
    assert coefficient == MAX_COEFFICIENT
    assert squared == pytest.approx((1.0 - MAX_COEFFICIENT * 1e-6) ** 2, rel=1e-9)
    assert stats.fit("step", 0, 1, 2) < (MAX_COEFFICIENT, stats.reuse_error("step", 1, 2))
    h[0, 2, 0] = 1e-6 - 1.0  # the other way: -1000
    assert stats_from({"step": h, "blocks.0.attn": h, "blocks.0.ff": h}, window=2).fit("step", 0, 1, 2)[0] == -1000.0


def test_plan_probe_with_a_format_2_plan_is_refused_as_a_bad_argument(tmp_path, capsys):
    from invardiff import ModelFacts, PlanProbeConfig

    reuse = CachePlan.reuse_nothing(ModelFacts.for_family("dit", {"transformer_blocks": 6}), 10)
    steps = np.zeros(10)
    reuse.step_cache[4], steps[4] = True, 0.5  # step 4 extrapolates from steps 2 and 3
    plan = CachePlan(reuse.model, 10, reuse.step_cache, reuse.module_reuse, step_extrapolation=steps)
    with pytest.raises(ValueError, match="plan\\+probe takes a plan without extrapolation coefficients"):
        PlanProbeConfig(plan, threshold=0.3)
    plan.save(tmp_path / "v2.json")
    argv = ["generate", "--model", "dit-digits", "--class", "3", "--policy", "plan+probe", "--threshold", "0.3"]
    code, err = run([*argv, "--plan", str(tmp_path / "v2.json"), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "Use the plan alone (policy plan)" in one_error_line(err)
    assert not (tmp_path / "out").exists()


SIZE_CASES = [
    # (family, pipeline size arguments, what the refusal says): the tiny pipelines have a VAE factor of 8 and
    # patches of 2 (Flux: 2x2 packing), so sides are multiples of 16; video frames are 1 + a multiple of 4.
    ("flux", {"height": 30, "width": 32}, "height=30 does not fit FluxPipeline: height must be a multiple of 16"),
    ("flux", {"height": 32, "width": 40}, "the nearest valid values are 32 and 48"),
    ("dit", {"height": 32}, "DiTPipeline takes no height"),
    ("wan", {"height": 30, "width": 30}, "height=30 does not fit WanPipeline: height must be a multiple of 16"),
    (
        "wan",
        {"num_frames": 6},
        "num_frames must be 1 + a multiple of 4 (the VAE's temporal factor 4); the nearest valid values are 5 and 9",
    ),  # fmt: skip
    ("hunyuanvideo", {"width": 8}, "the nearest valid values are 16."),
    ("hunyuanvideo", {"num_frames": 0}, "the nearest valid values are 1."),
]


@pytest.mark.parametrize(("family", "sizes", "says"), SIZE_CASES, ids=[f"{c[0]}-{c[1]}" for c in SIZE_CASES])
def test_calibration_refuses_sizes_off_the_patch_grid_before_sampling(family, sizes, says):
    from invardiff.calibration import InvarDiffThresholds, calibrate, record_trajectories

    from helpers import tiny_pipeline

    _, pipe = tiny_pipeline(family)
    inputs = {"class_labels": [1]} if family == "dit" else {"prompts": ["a cat"]}
    with pytest.raises(ValueError, match=re.escape(says)):
        calibrate(pipe, num_inference_steps=3, thresholds=InvarDiffThresholds(0.1, 0.5), pipeline_kwargs=sizes,
                  **inputs)  # fmt: skip
    item = inputs.get("class_labels", inputs.get("prompts"))[0]
    with pytest.raises(ValueError, match=re.escape(says)):  # the budgeted search's recording pass
        record_trajectories(pipe, num_inference_steps=3, cases=[(item, 0)], pipeline_kwargs=sizes)


def test_valid_sizes_pass_the_size_check():
    from invardiff.calibration.run import check_call_size

    from helpers import tiny_pipeline

    for family, sizes in [("flux", {"height": 48, "width": 16}), ("wan", {"height": 32, "width": 64, "num_frames": 9}),
                          ("hunyuanvideo", {"num_frames": 1}), ("dit", {})]:  # fmt: skip
        check_call_size(tiny_pipeline(family)[1], family, sizes)  # returns: no refusal


def test_wan_motion_calibration_at_30x30_is_one_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle moving left fast\n")
    argv = ["calibrate", "--model", "wan-motion", "--prompts", str(tmp_path / "p.txt"), "--preset", "debug-args"]
    code, err = run([*argv, "--height", "30", "--width", "30", "-o", str(tmp_path / "plan.json")], capsys)
    assert code == 2
    assert "height=30 does not fit WanMotionPipeline" in one_error_line(err) and "16 and 32" in err


def test_the_demo_report_quotes_times_beside_the_ratios_they_make():
    from invardiff.demo import report_markdown

    # Round 1 ran while the machine was busy: its full compute took 233.9 s against 56.0 s (4.18x); rounds 2 and 3
    # give 2.19x and 2.17x. The headline is the median of the rounds, 2.19x; the totals make 462.9 / 161.0 = 2.88x.
    full, cached = [233.9, 120.0, 109.0], [56.0, 54.8, 50.2]
    ratios = [f / c for f, c in zip(full, cached, strict=True)]
    report = {
        "model": "dit-digits", "preset": "fast", "num_inference_steps": 50, "rounds": 3,
        "measured_speedup": sorted(ratios)[1], "round_speedups": ratios, "spread": (max(ratios) - min(ratios)) / 2.19,
        "timing_warnings": [], "ideal_speedup": 2.67, "psnr": 31.3, "ssim": 0.99, "lpips": 0.015,
        "worst": {"psnr": 27.6, "ssim": 0.98, "lpips": 0.03}, "steps_step_cached": 24,
        "seconds": {"full": 120.0, "cached": 54.8}, "round_seconds": {"full": full, "cached": cached},
    }  # fmt: skip
    text = report_markdown(report, "Grid")
    assert "| measured speedup (median of rounds) |" in text and "| 2.19x | 2.67x |" in text
    assert "Measured speedup 2.19x: the median of the 3 rounds' speedups" in text
    rounds = "round 1: 233.9 s / 56.0 s = 4.18x; round 2: 120.0 s / 54.8 s = 2.19x; round 3: 109.0 s / 50.2 s = 2.17x"
    assert rounds in text
    assert "All rounds together: full compute 462.9 s, with the plan 161.0 s, a total-time ratio of 2.88x" in text
    # Every speedup in the text is the headline, the ideal, a round's own ratio or the labelled total-time ratio.
    quoted = {float(x) for x in re.findall(r"(\d+\.\d+)x", text)}
    assert quoted == {2.19, 2.67, 4.18, 2.17, 2.88}
    assert "120.00 s" not in text  # no median time quoted without its ratio (it read 233.9 s against 56.0 s)
