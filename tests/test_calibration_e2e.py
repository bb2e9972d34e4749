"""`invardiff calibrate` end to end on tiny random FluxPipeline and DiTPipeline; the plans run in the engine."""

import json

import numpy as np
import pytest

import invardiff
from invardiff import CachePlan
from invardiff.calibration import CalibrationRates, calibrate, preset
from invardiff.cli.main import main
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline

from helpers import run_pipeline


STEPS = 10
FLUX_ARGS = ["--model-config", "flux-tiny", "--height", "128", "--width", "128", "--max-sequence-length", "8"]


def _calibrate_cli(tmp_path, family, name="plan.json", seeds="3,4"):
    out = tmp_path / name
    if family == "flux":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red cat\nblue sky over a house\n")
        args = [*FLUX_ARGS, "--prompts", str(prompts), "--preset", "fast"]
    else:
        args = ["--model-config", "dit-tiny", "--classes", "1,5,7", "--preset", "slow"]
    assert main(["calibrate", *args, "--seeds", seeds, "--steps", str(STEPS), "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_calibrate_writes_a_plan_that_runs_in_the_engine(family, tmp_path, capsys):
    path = _calibrate_cli(tmp_path, family)
    plan = CachePlan.load(path)
    calibration = plan.provenance["calibration"]
    assert plan.num_inference_steps == STEPS and plan.provenance["correction"] == "exact"
    assert calibration["seeds"] == [3, 4]
    assert calibration["inputs"] == (["a red cat", "blue sky over a house"] if family == "flux" else [1, 5, 7])
    assert calibration["num_runs"] == (4 if family == "flux" else 6)
    assert set(calibration["versions"]) >= {"invardiff", "torch", "diffusers"}
    assert plan.provenance["thresholds"] == preset(family, "fast" if family == "flux" else "slow").to_dict()
    rates = CalibrationRates.load(path.with_name("plan.rates.npz"))
    assert rates.num_runs == calibration["num_runs"]
    assert rates.build_plan() == plan  # the rates file rebuilds the plan exactly

    config = MODEL_CONFIGS[f"{family}-tiny"]
    pipe = build_pipeline(config, config.build_transformer())
    with invardiff.enabled(pipe, plan):
        run_pipeline(pipe, config, STEPS)
        summary = invardiff.summary(pipe)
    branch = next(iter(summary.branches.values()))
    assert branch.step_status.tolist() == plan.step_cache.astype(int).tolist()
    assert capsys.readouterr().out.count("wrote") == 1


def test_same_inputs_and_seeds_give_a_byte_identical_plan(tmp_path):
    first = _calibrate_cli(tmp_path, "dit", "a.json")
    second = _calibrate_cli(tmp_path, "dit", "b.json")
    assert first.read_bytes() == second.read_bytes()
    other_seed = _calibrate_cli(tmp_path, "dit", "c.json", seeds="5,6")
    assert json.loads(other_seed.read_text())["provenance"]["calibration"]["seeds"] == [5, 6]


def test_build_plan_at_other_thresholds_needs_an_explicit_correction(tmp_path, capsys):
    path = _calibrate_cli(tmp_path, "flux")
    rates = tmp_path / "plan.rates.npz"
    assert main(["build-plan", str(rates), "--preset", "slow", "-o", str(tmp_path / "slow.json")]) == 2
    assert "Re-run `invardiff calibrate` with these thresholds" in capsys.readouterr().err
    assert (
        main(
            ["build-plan", str(rates), "--preset", "slow", "--correction", "stored", "-o", str(tmp_path / "slow.json")]
        )
        == 0
    )
    slow = CachePlan.load(tmp_path / "slow.json")
    assert slow.provenance["correction"] == "stored"
    assert slow.provenance["thresholds"]["nonskip_rate"] == 0.22
    assert not slow.step_cache[:2].any()  # n_ns = floor(0.22 * 10) = 2
    assert main(["build-plan", str(rates), "-o", str(tmp_path / "same.json")]) == 0
    assert (tmp_path / "same.json").read_bytes() == path.read_bytes()
    assert main(["build-plan", str(rates), "--max-step-run", "1", "-o", str(tmp_path / "capped.json")]) == 0
    capped, same = CachePlan.load(tmp_path / "capped.json"), CachePlan.load(path)
    assert capped.provenance["max_step_run"] == 1
    assert not (capped.step_cache[1:] & capped.step_cache[:-1]).any()  # never two step-cached steps in a row
    assert (capped.step_cache <= same.step_cache).all()


def test_library_calibrate_runs_per_sample_and_rejects_wrong_inputs():
    config = MODEL_CONFIGS["dit-tiny"]
    pipe = build_pipeline(config, config.build_transformer())
    plan, rates = calibrate(
        pipe, num_inference_steps=6, thresholds="fast", class_labels=[3, 4], seeds=[0, 1, 2], batch_size=4
    )
    assert rates.first_step.shape == (6, 6) and rates.first_modules["transformer_blocks.ff"].shape == (6, 6, 2)
    assert np.isnan(rates.first_step[:, [0, 5]]).all() and np.isfinite(rates.first_step[:, 1:5]).all()
    with pytest.raises(ValueError, match="Calibrating a dit pipeline needs class_labels"):
        calibrate(pipe, num_inference_steps=6, thresholds="fast", prompts=["a cat"])
    with pytest.raises(ValueError, match="Unknown dit preset 'medium-1'"):
        calibrate(pipe, num_inference_steps=6, thresholds="medium-1", class_labels=[1])


def test_plot_rates_writes_a_png(tmp_path, capsys):
    _calibrate_cli(tmp_path, "dit")
    png = tmp_path / "rates.png"
    assert main(["plot", str(tmp_path / "plan.rates.npz"), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
