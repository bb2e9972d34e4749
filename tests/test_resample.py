"""resample_plan: a plan moved to another step count on the sampler's time axis, and the opt-in automatic
resampling of PlanConfig(resample_steps=True)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import invardiff
from invardiff.plan import PlanError
from invardiff.plan_transforms import resample_plan

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline


# An InvarDiff-like plan at 28 steps: warm-up 2 (nonskip 0.1), runs of step reuse, module reuse at 23-26.
STEPS_28 = "0010111111011101111111000000"
MODULES_28 = ["0" * 2] * 23 + ["11"] * 4 + ["00"]


def plan_28():
    _, pipe = tiny_pipeline("dit")
    facts = facts_for(pipe.transformer, "dit")
    layers = facts.block_lists[0].num_layers
    rows = [row[:1] * layers for row in MODULES_28]
    plan = plan_from_bits(facts, STEPS_28, {"transformer_blocks": {"attn": rows, "ff": rows}})
    return plan.__class__(
        plan.model, 28, plan.step_cache, plan.module_reuse, provenance={"thresholds": {"nonskip_rate": 0.1}}
    )


@pytest.mark.parametrize("num_steps", [12, 20, 28, 50, 100])
def test_resampled_plan_keeps_forced_steps_and_the_reuse_fraction(num_steps):
    plan = plan_28()
    resampled = resample_plan(plan, num_steps)
    warmup = max(1, int(0.1 * num_steps))
    assert resampled.num_inference_steps == num_steps
    assert not resampled.step_cache[:warmup].any() and not resampled.step_cache[-1]
    assert abs(resampled.step_cache.sum() - plan.step_cache.mean() * num_steps) <= 1  # within one step
    for matrix in resampled.module_reuse["transformer_blocks"].values():
        assert not matrix[:warmup].any() and not matrix[-1].any()
    assert resampled.provenance["resampled_from"] == {"num_steps": 28, "axis": "index"}


def test_resampling_to_the_same_step_count_is_the_identity():
    plan = plan_28()
    same = resample_plan(plan, 28)
    assert np.array_equal(same.step_cache, plan.step_cache)
    executed = ~plan.step_cache  # step-cached rows never execute (resampling marks them reused)
    for kind, matrix in plan.module_reuse["transformer_blocks"].items():
        assert np.array_equal(same.module_reuse["transformer_blocks"][kind][executed], matrix[executed])


def test_schedules_place_the_steps_on_the_time_axis():
    # Steps 0..4 at timesteps 1000, 990, 980, 500, 0: the reused step 2 sits near the start of the trajectory, so a
    # uniform 9-step schedule reuses where its timesteps are near 980, not at the middle of the step range.
    _, pipe = tiny_pipeline("dit")
    facts = facts_for(pipe.transformer, "dit")
    plan = plan_from_bits(facts, "00100")
    source = np.array([1000.0, 990.0, 980.0, 500.0, 0.0])
    target = np.linspace(1000.0, 0.0, 9)
    on_schedule = resample_plan(plan, 9, source, target)
    by_index = resample_plan(plan, 9)
    assert np.flatnonzero(on_schedule.step_cache).tolist() == [1, 2]  # timesteps 875, 750: nearest to 980
    assert np.flatnonzero(by_index.step_cache).tolist() == [4, 5]
    with pytest.raises(ValueError, match="strictly monotonic"):
        resample_plan(plan, 9, source[::-1].copy() * 0, target)


def test_automatic_resampling_is_opt_in_and_logged(caplog):
    config, pipe = tiny_pipeline("dit")
    plan = plan_from_bits(facts_for(pipe.transformer, "dit"), "00110")
    invardiff.enable(pipe, invardiff.PlanConfig(plan))
    try:
        with pytest.raises(PlanError, match="5 inference steps but the run has 8"):
            run_pipeline(pipe, config, 8)
    finally:
        invardiff.disable(pipe)
    invardiff.enable(pipe, invardiff.PlanConfig(plan, resample_steps=True))
    try:
        with caplog.at_level(logging.WARNING, logger="invardiff"):
            run_pipeline(pipe, config, 8)
        summary = invardiff.summary(pipe)
    finally:
        invardiff.disable(pipe)
    assert "resampled" in caplog.text
    branch = next(iter(summary.branches.values()))
    assert len(branch.step_status) == 8 and (branch.step_status == 1).sum() == round(0.4 * 8)
