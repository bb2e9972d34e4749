"""Step accounting: explicit step indices still check the step count, multi-call-per-step schedulers are refused by
every policy, and the timestep check tolerates the rounding of the call's dtype (fp16, bf16) over 28-100 steps."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import invardiff
from invardiff import CachePlan
from invardiff.calibration.record_policy import RecordConfig
from invardiff.engine import engine as engine_module
from invardiff.engine.engine import EngineError, TimestepCheck
from invardiff.model_configs import MODEL_CONFIGS

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline


def _flux_schedule(steps: int) -> torch.Tensor:
    # FluxPipeline's schedule at 1024x1024 (4096 image tokens): linear sigmas, shifted with mu.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(4096))
    return scheduler.timesteps


@pytest.fixture(params=["host", "device"])
def check_path(request, monkeypatch):
    # The CPU checks each call on host floats; an accelerator folds the check on the device and reads it once. The
    # device path runs here on the CPU by making host reads look costly, so both paths face the same cases.
    if request.param == "device":
        monkeypatch.setattr(engine_module, "host_reads_are_free", lambda device: False)
    return request.param


def _finish(check: TimestepCheck) -> None:
    check.verify("cond")  # the device path's one read; nothing is pending on the host path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("steps", [28, 50, 70, 100])
def test_timestep_check_accepts_the_rounding_of_the_calls_dtype(dtype, steps, check_path):
    timesteps = _flux_schedule(steps)
    check = TimestepCheck(timesteps, scale=1000.0)
    for step, t in enumerate(timesteps):
        check.add(t.expand(1).to(dtype) / 1000, step, "cond")  # what FluxPipeline passes; raises on a mismatch
    _finish(check)


def test_the_former_fixed_tolerance_flagged_bf16_flux_at_70_and_100_steps():
    # Why the tolerance depends on the dtype: with a relative 1e-6 the bf16 calls near t = 1000 look closer to a
    # neighbouring entry than to their own (the reported false alarm).
    for steps, expected in ((70, 3), (100, 17)):
        timesteps = _flux_schedule(steps)
        values = timesteps.float()
        false_alarms = 0
        for step, t in enumerate(timesteps):
            sent = (t.expand(1).to(torch.bfloat16) / 1000).float()[0] * 1000
            distance = (values - sent).abs()
            false_alarms += int(distance[step] > distance.min() + 1e-6 * max(abs(sent.item()), 1.0))
        assert false_alarms == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_call_one_step_off_is_still_caught_in_low_precision(dtype, check_path):
    timesteps = _flux_schedule(28)
    check = TimestepCheck(timesteps, scale=1000.0)
    check.add(timesteps[0].expand(1).to(dtype) / 1000, 0, "cond")
    with pytest.raises(EngineError, match="scheduler's schedule says step 1"):
        check.add(timesteps[2].expand(1).to(dtype) / 1000, 1, "cond")  # step 1 sent step 2's timestep
        _finish(check)


def test_a_batch_with_two_timesteps_is_caught(check_path):
    timesteps = _flux_schedule(28)
    check = TimestepCheck(timesteps, scale=1000.0)
    with pytest.raises(EngineError, match="has timestep"):
        check.add(torch.stack([timesteps[0], timesteps[1]]) / 1000, 0, "cond")  # one sample a step ahead
        _finish(check)


def test_a_reversed_timestep_is_mapped_back_onto_the_schedule(check_path):
    # ZImagePipeline passes (1000 - t) / 1000 (0 = noise, 1 = clean): its family's offset 1000 and scale -1000.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Z-Image-Turbo's 9 steps
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 9, 9))
    timesteps = scheduler.timesteps
    check = TimestepCheck(timesteps, scale=-1000.0, offset=1000.0)
    for step, t in enumerate(timesteps):
        check.add((1000 - t.expand(2)) / 1000, step, "default")
    _finish(check)
    check = TimestepCheck(timesteps, scale=-1000.0, offset=1000.0)
    check.add((1000 - timesteps[:1]) / 1000, 0, "default")
    with pytest.raises(EngineError, match="scheduler's schedule says step 1"):
        check.add((1000 - timesteps[2:3]) / 1000, 1, "default")  # step 1 sent step 2's timestep
        _finish(check)


def test_the_nearest_entry_is_found_in_any_order_of_the_schedule(check_path):
    # The host path finds the nearest entry by bisecting the sorted schedule: an unsorted one (no scheduler makes
    # one; the check must not rely on order) gives the same verdicts as the device path's full scan.
    timesteps = _flux_schedule(28)[torch.randperm(28, generator=torch.Generator().manual_seed(0))]
    check = TimestepCheck(timesteps, scale=1000.0)
    for step, t in enumerate(timesteps):
        check.add(t.expand(1) / 1000, step, "cond")
    _finish(check)
    check = TimestepCheck(timesteps, scale=1000.0)
    with pytest.raises(EngineError, match="scheduler's schedule says step 0"):
        check.add(timesteps[1].expand(1) / 1000, 0, "cond")  # step 0 sent step 1's timestep
        _finish(check)
    check = TimestepCheck(timesteps, scale=1000.0)
    with pytest.raises(EngineError, match="scheduler's schedule says step 3"):
        check.add(torch.tensor([2000.0]) / 1000, 3, "cond")  # beyond the last entry: nearest is the largest
        _finish(check)


@pytest.mark.slow  # bf16 matmuls are slow on the CPU: about 2 minutes
def test_bf16_flux_pipeline_at_100_steps_runs_a_plan():
    config = dataclasses.replace(MODEL_CONFIGS["flux-tiny"], dtype="bfloat16")
    _, pipe = tiny_pipeline("flux")
    pipe.transformer.to(torch.bfloat16)
    plan = CachePlan.reuse_nothing(facts_for(pipe.transformer, "flux"), 100)
    with invardiff.enabled(pipe, plan):
        run_pipeline(pipe, config, 100)
        assert invardiff.summary(pipe).branches["cond"].counts()["transformer_blocks"]["attn"]["computed"] == 200


# ----- explicit step indices -----
def _manual_loop(transformer, call, steps):
    for step in range(steps):
        with invardiff.cache_context(transformer, "default", step_index=step):
            transformer(**call)


def test_explicit_steps_a_short_run_is_reported_at_the_next_run():
    config = MODEL_CONFIGS["flux-tiny"]
    transformer, call = config.build_transformer(), config.example_call()
    plan = plan_from_bits(facts_for(transformer, "flux"), "00010101")
    with invardiff.enabled(transformer, plan):
        _manual_loop(transformer, call, 6)  # an 8-step plan, 6 calls
        with pytest.raises(EngineError, match="previous run stopped after 6 of the 8 steps of the plan policy"):
            _manual_loop(transformer, call, 8)
        invardiff.reset(transformer)  # abandoning a run on purpose
        _manual_loop(transformer, call, 8)
        _manual_loop(transformer, call, 8)  # a complete run followed by a new one is fine
        with pytest.raises(EngineError, match="outside the plan's 8 steps"):
            with invardiff.cache_context(transformer, "default", step_index=8):
                transformer(**call)


# ----- multi-call-per-step schedulers -----
class _Recorder:
    def on_unit(self, state, unit, output):
        pass

    def on_hidden(self, state, hidden):
        pass


def _dit_policies(transformer, steps):
    plan = plan_from_bits(facts_for(transformer, "dit"), "0" * steps)
    return {
        "plan": plan,
        "interval": invardiff.IntervalConfig(interval=2),
        "dicache": invardiff.DiCacheConfig(threshold=0.1),
        "plan+probe": invardiff.PlanProbeConfig(plan, threshold=0.1),
        "calibration record": RecordConfig(CachePlan.reuse_nothing(facts_for(transformer, "dit"), steps), _Recorder()),
    }


@pytest.mark.parametrize("scheduler_class", [HeunDiscreteScheduler, KDPM2DiscreteScheduler])
@pytest.mark.parametrize("policy", ["plan", "interval", "dicache", "plan+probe", "calibration record"])
def test_every_policy_refuses_a_second_order_scheduler(scheduler_class, policy):
    config, pipe = tiny_pipeline("dit")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    invardiff.enable(pipe, _dit_policies(pipe.transformer, 4)[policy])
    with pytest.raises(EngineError, match=rf"{scheduler_class.__name__} makes 2 transformer calls per denoising step"):
        run_pipeline(pipe, config, 4)
    invardiff.disable(pipe)
