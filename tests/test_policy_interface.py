"""The runtime policy interface: the engine imports no policy, a skip never unwinds the model's forward, host syncs
per step, the interval policy on a hand-computable toy, and bit identity in float32, bfloat16 and float16."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from scripted_family import ScriptedTransformer
from sync_counter import count_host_syncs

import invardiff
import invardiff.engine.engine as engine_module
from invardiff import CachePlan, IntervalConfig

from helpers import (
    T_PROBE,
    batched_call,
    euler_loop,
    facts_for,
    plan_from_bits,
    run_pipeline,
    tiny_pipeline,
)
from test_engine_exact import FLUX_MODULES, STEP_ONLY, T


def test_importing_the_engine_imports_no_policy_package():
    code = "import sys, invardiff.engine; print(sorted(m for m in sys.modules if m.startswith('invardiff.dicache')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----- interval policy on the scripted toy: block b adds table[b][step]; the head is the identity -------------
A = [1.0, 1.2, 1.4, 1.5, 1.6, 2.3, 2.4, 2.5]
B = [0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05, 0.0]


def _scripted_run(config, x: float = 1.0):
    model = ScriptedTransformer([A, B])
    invardiff.enable(model, config)
    try:
        outputs = []
        for step in range(len(A)):
            with invardiff.cache_context(model, "default", step_index=step):
                (y,) = model(hidden_states=torch.full((1, 1, 1), x), timestep=torch.tensor([step]))
            outputs.append(round(float(y), 6))
        return outputs, invardiff.summary(model).branches["default"]
    finally:
        invardiff.disable(model)


def test_interval_reuses_the_last_computed_state():
    # warm-up 2 (steps 0, 1), then every 3rd step (2, 5) and the last (7): H = x + a + b on those, else repeated.
    outputs, branch = _scripted_run(IntervalConfig(interval=3, warmup_steps=2, num_inference_steps=8))
    assert outputs == [2.5, 2.6, 2.7, 2.7, 2.7, 3.4, 3.4, 3.5]
    assert branch.to_dict()["steps"] == ["computed"] * 3 + ["step_cached"] * 2 + ["computed"] + [
        "step_cached",
        "computed",
    ]


def test_interval_first_order_extrapolates_from_the_last_two_computed_steps():
    # Computed H: step 1 = 2.6, step 2 = 2.7, step 5 = 3.4. Step 3: 2.7 + 1 * 0.1 = 2.8, step 4: 2.9;
    # step 6: 3.4 + (6 - 5) / (5 - 2) * (3.4 - 2.7) = 3.633333.
    outputs, _ = _scripted_run(IntervalConfig(interval=3, warmup_steps=2, order=1, num_inference_steps=8))
    assert outputs == [2.5, 2.6, 2.7, 2.8, 2.9, 3.4, 3.633333, 3.5]


def test_interval_follows_the_schedulers_step_count_and_interval_one_is_stock():
    config, pipe = tiny_pipeline("flux")
    stock = run_pipeline(pipe, config, 6)
    with invardiff.enabled(pipe, IntervalConfig(interval=1)):
        assert torch.equal(run_pipeline(pipe, config, 6), stock)
    with invardiff.enabled(pipe, IntervalConfig(interval=2, warmup_steps=1)):
        run_pipeline(pipe, config, 7)
        steps = invardiff.summary(pipe).branches["cond"].to_dict()["steps"]
    assert steps == ["computed", "computed", "step_cached", "computed", "step_cached", "computed", "computed"]


@pytest.mark.parametrize("bad", [dict(interval=0), dict(interval=2, warmup_steps=0), dict(interval=2, order=2)])
def test_interval_config_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        IntervalConfig(**bad)


# ----- skipping the deep blocks is an ordinary forward for every other hook ------------------------------------
class _CountingHook(ModelHook):
    def __init__(self):
        super().__init__()
        self.finished = 0

    def post_forward(self, module, output):
        self.finished += 1
        return output


def test_a_probe_skip_does_not_unwind_other_hooks_on_the_model():
    # Registered before invardiff, the hook sits between invardiff's step hook and the blocks. A skip that raised
    # through the forward (the old SkipRemainingBlocks) bypassed its post_forward on every skipped step.
    _, transformer, call = batched_call("flux")
    outer = _CountingHook()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(outer, "outer")
    config = invardiff.DiCacheConfig(threshold=10.0, num_inference_steps=T_PROBE, per_sample=False)
    _, branch = euler_loop(transformer, "flux", call, config)
    assert "skipped" in branch.to_dict()["probe"]["decision"][T_PROBE // 2]  # the run did skip
    assert outer.finished == T_PROBE


# ----- host syncs per step --------------------------------------------------------------------------------------
@pytest.fixture
def deferred_checks(monkeypatch):
    # Count what an accelerator run would do: on the CPU the timestep check reads its result at every call, since
    # that read is free there; on a GPU it is folded on the device and read once per run.
    monkeypatch.setattr(engine_module, "host_reads_are_free", lambda device: False)


def _plan(transformer):
    return plan_from_bits(facts_for(transformer, "flux"), STEP_ONLY, FLUX_MODULES)


@pytest.mark.parametrize(
    "make_config",
    [
        pytest.param(_plan, id="plan"),
        pytest.param(lambda t: invardiff.DiCacheConfig(threshold=0.3), id="dicache"),
        pytest.param(lambda t: invardiff.PlanProbeConfig(_plan(t), threshold=0.3), id="plan+probe"),
        pytest.param(lambda t: IntervalConfig(interval=2), id="interval"),
    ],
)
def test_at_most_one_host_sync_per_step(make_config, deferred_checks):
    config, pipe = tiny_pipeline("flux")
    run_pipeline(pipe, config, T)  # warm up lazily built modules outside the count
    invardiff.enable(pipe, make_config(pipe.transformer))
    try:
        with count_host_syncs() as syncs:
            run_pipeline(pipe, config, T)
    finally:
        invardiff.disable(pipe)
    assert syncs.at("invardiff/") <= T, syncs.report()


def test_a_deferred_timestep_mismatch_is_still_an_error(deferred_checks):
    config, pipe = tiny_pipeline("dit")
    invardiff.enable(pipe, CachePlan.reuse_nothing(facts_for(pipe.transformer, "dit"), 8))
    pipe.scheduler.set_timesteps(8)
    timesteps = pipe.scheduler.timesteps
    call = config.example_call()
    with pytest.raises(invardiff.EngineError, match="has timestep 750, but the scheduler's schedule says step 3"):
        for step in range(8):  # step 3 gets step 1's timestep; the check reads its result at the last step
            call["timestep"] = timesteps[1 if step == 3 else step].repeat(2)
            pipe.transformer(**call)


# ----- bit identity in every dtype --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["flux", "dit"])
def test_reuse_nothing_probe_at_zero_and_disable_are_bit_identical(family, dtype):
    _, transformer, call = batched_call(family)
    transformer.to(dtype)
    call = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in call.items()}
    stock, _ = euler_loop(transformer, family, call)
    nothing = CachePlan.reuse_nothing(facts_for(transformer, family), T_PROBE)
    assert torch.equal(euler_loop(transformer, family, call, nothing)[0], stock)
    never_skips = invardiff.DiCacheConfig(threshold=0.0, num_inference_steps=T_PROBE)
    latents, branch = euler_loop(transformer, family, call, never_skips)
    assert torch.equal(latents, stock)
    assert not np.isin(branch.to_dict()["probe"]["decision"], ["skipped"]).any()
    assert torch.equal(euler_loop(transformer, family, call)[0], stock)  # after disable


def test_a_call_the_policy_refuses_leaves_no_half_run_behind():
    _, transformer, call = batched_call("flux")
    invardiff.enable(transformer, invardiff.DiCacheConfig(threshold=0.3, num_inference_steps=T_PROBE))
    try:
        residual = torch.zeros_like(call["hidden_states"][..., :1]).expand(-1, -1, 32)
        with pytest.raises(NotImplementedError, match="ControlNet residuals"):
            with invardiff.cache_context(transformer, "default", step_index=0):
                transformer(**call, controlnet_block_samples=[residual])
        with pytest.raises(invardiff.EngineError, match="got step 1 after no step yet"):
            with invardiff.cache_context(transformer, "default", step_index=1):
                transformer(**call)
        with invardiff.cache_context(transformer, "default", step_index=0):
            transformer(**call)  # a fresh run starts cleanly
        assert invardiff.summary(transformer).cache_bytes > 0
    finally:
        invardiff.disable(transformer)
