"""`invardiff calibrate --budget / --pareto` and `invardiff resample-plan` on a tiny random-weight DiT."""

from __future__ import annotations

import pytest

from invardiff.calibration.batching import pipeline_call_config
from invardiff.cli.main import main
from invardiff.cli.search_commands import few_step_hint
from invardiff.flops import profile_flops
from invardiff.plan import CachePlan
from invardiff.stats import ideal_speedup

from helpers import tiny_pipeline


@pytest.mark.slow
def test_calibrate_budget_and_pareto_write_plans_that_meet_their_targets(tmp_path, capsys):
    common = ["calibrate", "--model-config", "dit-tiny", "--classes", "1,2", "--steps", "10", "--window", "4"]
    assert main([*common, "--budget", "2x", "--extrapolate", "both", "-o", str(tmp_path / "plan.json")]) == 0
    assert main([*common, "--pareto", "1.5,2.5", "-o", str(tmp_path / "front.json")]) == 0
    _, pipe = tiny_pipeline("dit")
    flops = profile_flops(pipeline_call_config(pipe, "dit", {"num_inference_steps": 10, "guidance_scale": 1.0}))
    plan = CachePlan.load(tmp_path / "plan.json")
    assert plan.extrapolates and plan.to_dict()["format_version"] == 2
    full_step_share = (flops.full_step - flops.step_cached) / (10 * flops.full_step)  # one step's worth
    written = {"plan.json": 2.0, "front-1.5x.json": 1.5, "front-2.5x.json": 2.5}
    for name, target in written.items():
        speedup = ideal_speedup(CachePlan.load(tmp_path / name), flops)
        assert speedup >= target and 1 / speedup >= 1 / target - full_step_share
    assert (tmp_path / "plan.trajectories.npz").exists()
    assert "front-2.5x.json" in capsys.readouterr().out


def test_budget_and_preset_are_exclusive(tmp_path, capsys):
    argv = ["calibrate", "--model-config", "dit-tiny", "--classes", "1", "--steps", "6", "--budget", "2x"]
    assert main([*argv, "--preset", "fast", "-o", str(tmp_path / "p.json")]) == 2
    assert "drop --preset" in capsys.readouterr().err


def test_resample_plan_command(tmp_path, capsys):
    from helpers import facts_for, plan_from_bits

    _, pipe = tiny_pipeline("dit")
    plan_from_bits(facts_for(pipe.transformer, "dit"), "0011011000").save(tmp_path / "p10.json")
    assert main(["resample-plan", str(tmp_path / "p10.json"), "--steps", "20", "-o", str(tmp_path / "p20.json")]) == 0
    resampled = CachePlan.load(tmp_path / "p20.json")
    assert resampled.num_inference_steps == 20 and resampled.step_cache.sum() == 8
    assert "10 -> 20 steps" in capsys.readouterr().out


def test_verify_chooses_the_cap_itself(tmp_path, capsys):
    argv = ["calibrate", "--model-config", "dit-tiny", "--classes", "1", "--steps", "6", "--budget", "2x", "--verify"]
    assert main([*argv, "--max-run", "2", "-o", str(tmp_path / "p.json")]) == 2
    assert "drop --max-run" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--refine", "2"], ["--verify", "--refine", "-1"]])
def test_refine_needs_verify_and_a_round_count(tmp_path, capsys, extra):
    argv = ["calibrate", "--model-config", "dit-tiny", "--classes", "1", "--steps", "6", "--budget", "2x"]
    assert main([*argv, *extra, "-o", str(tmp_path / "p.json")]) == 2
    assert "--refine takes a number of rounds >= 0 and needs --verify" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_step_order_2_refits_the_searched_plan_and_checks_its_options(tmp_path, capsys):
    argv = ["calibrate", "--model-config", "dit-tiny", "--classes", "1,2", "--steps", "10", "--window", "6"]
    assert main([*argv, "--budget", "2x", "--step-order", "2", "-o", str(tmp_path / "p.json")]) == 2
    assert "add --extrapolate steps" in capsys.readouterr().err
    written = tmp_path / "second.json"
    assert main([*argv, "--budget", "2x", "--extrapolate", "steps", "--step-order", "2", "-o", str(written)]) == 0
    plan = CachePlan.load(written)
    assert plan.to_dict()["format_version"] == 4 and plan.provenance["search"]["second_order"]["steps"] > 0
    assert (plan.step_extrapolation2 != 0).any()
    assert main(["inspect", str(written), "--model-config", "dit-tiny"]) == 0
    assert "at second order, two lerps each" in capsys.readouterr().out
    assert main([*argv, "--budget", "2x", "--fit-window", "8", "-o", str(tmp_path / "p.json")]) == 2
    assert "needs --step-order 2" in capsys.readouterr().err
    second = ["--budget", "2x", "--extrapolate", "steps", "--step-order", "2"]
    assert main([*argv, *second, "--fit-window", "4", "-o", str(tmp_path / "p.json")]) == 2
    assert "at least window (6)" in capsys.readouterr().err


def test_refine_reports_the_sampled_error_of_the_plan_it_wrote(tmp_path, capsys):
    argv = ["calibrate", "--model-config", "dit-tiny", "--classes", "1,2", "--steps", "10", "--window", "6"]
    written = tmp_path / "refined.json"
    assert (
        main([*argv, "--budget", "2x", "--extrapolate", "steps", "--verify", "--refine", "2", "-o", str(written)]) == 0
    )
    search = CachePlan.load(written).provenance["search"]
    final = search["refined"]["moves"][-1][1]  # not the verified start's error, which the descent lowered
    assert final < search["verified"]["output_mse"]
    out, err = capsys.readouterr()
    assert f"sampled output MSE {final:.3g})" in out
    assert "descend on sampled error" not in err  # 10 steps, but the descent was asked for


def test_a_few_step_budget_without_the_descent_is_told_to_add_it():
    # At 10 steps or fewer (the few-step sweep's bound) the additive model's pick of reused steps often samples
    # worse than a neighbour (README: few-step sampling); calibrate --budget says so unless --refine is given.
    assert "add --verify --refine 4" in few_step_hint(8, verify=False, refine=0)
    assert "add --refine 4" in few_step_hint(10, verify=True, refine=0)
    assert few_step_hint(8, verify=True, refine=2) is None
    assert few_step_hint(11, verify=False, refine=0) is None and few_step_hint(28, verify=True, refine=0) is None
