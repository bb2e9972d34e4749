"""Runs that do not follow the plan, and misuse of the API, fail with clear errors; disable restores the model."""

import copy

import pytest
import torch

import invardiff
from invardiff import EngineError, PlanError

from helpers import facts_for, plan_from_bits, run_pipeline, tiny_pipeline


def test_step_count_mismatch_is_an_error_before_anything_runs():
    config, pipe = tiny_pipeline("flux")
    invardiff.enable(pipe, invardiff.CachePlan.reuse_nothing(facts_for(pipe.transformer, "flux"), 8))
    with pytest.raises(PlanError, match="plan is for 8 inference steps but the run has 6"):
        run_pipeline(pipe, config, 6)
    assert run_pipeline(pipe, config, 8).shape[1] == 64  # a correct call right after works


def test_plan_for_another_depth_or_family_is_rejected_at_enable():
    _, pipe = tiny_pipeline("flux")
    deeper = invardiff.ModelFacts.for_family("flux", {"transformer_blocks": 19, "single_transformer_blocks": 38})
    with pytest.raises(PlanError, match="expects 19 blocks in 'transformer_blocks' but the model has 2"):
        invardiff.enable(pipe, invardiff.CachePlan.reuse_nothing(deeper, 8))
    dit_plan = invardiff.CachePlan.reuse_nothing(invardiff.ModelFacts.for_family("dit", {"transformer_blocks": 2}), 8)
    with pytest.raises(PlanError, match="plan is for model family 'dit'"):
        invardiff.enable(pipe, dit_plan)
    assert not invardiff.is_enabled(pipe)


def test_unsupported_model_and_target():
    with pytest.raises(ValueError, match="Model class Linear is not supported by invardiff"):
        invardiff.enable(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="Expected a diffusers pipeline"):
        invardiff.enable("flux", None)


def test_enable_twice_and_disable_without_enable():
    _, pipe = tiny_pipeline("dit")
    plan = invardiff.CachePlan.reuse_nothing(facts_for(pipe.transformer, "dit"), 50)
    invardiff.enable(pipe, plan)
    with pytest.raises(ValueError, match="already enabled"):
        invardiff.enable(pipe, plan)
    invardiff.disable(pipe)
    with pytest.raises(ValueError, match="not enabled"):
        invardiff.disable(pipe)


def _manual_call(config, transformer, step, batch=1, tokens=None):
    call = config.example_call(timestep=1 - step / 8)
    if tokens is not None:
        call["hidden_states"] = call["hidden_states"][:, :tokens]
        call["img_ids"] = call["img_ids"][:tokens]
    if batch != 1:
        call = {
            k: (v.repeat(batch, *[1] * (v.ndim - 1)) if torch.is_tensor(v) and k not in ("img_ids", "txt_ids") else v)
            for k, v in call.items()
        }
    return transformer(**call)


def test_manual_loop_needs_a_step_index():
    config, pipe = tiny_pipeline("flux")
    transformer = pipe.transformer
    invardiff.enable(transformer, plan_from_bits(facts_for(transformer, "flux"), "0100"))
    with pytest.raises(EngineError, match="step index of this transformer call is unknown"):
        _manual_call(config, transformer, 0)


def test_steps_out_of_order_and_too_many_steps():
    config, pipe = tiny_pipeline("flux")
    transformer = pipe.transformer
    invardiff.enable(transformer, plan_from_bits(facts_for(transformer, "flux"), "0100"))
    with invardiff.cache_context(transformer, "cond", step_index=0):
        _manual_call(config, transformer, 0)
    with pytest.raises(EngineError, match="Branch 'cond' got step 2 after step 0"):
        with invardiff.cache_context(transformer, "cond", step_index=2):
            _manual_call(config, transformer, 2)
    with pytest.raises(EngineError, match="Step index 4 on branch 'cond' is outside the plan's 4 steps"):
        with invardiff.cache_context(transformer, "cond", step_index=4):
            _manual_call(config, transformer, 4)


@pytest.mark.parametrize("change", ["batch", "resolution"])
def test_shape_change_within_a_run_is_an_error(change):
    config, pipe = tiny_pipeline("flux")
    transformer = pipe.transformer
    invardiff.enable(transformer, plan_from_bits(facts_for(transformer, "flux"), "0100"))
    with invardiff.cache_context(transformer, "cond", step_index=0):
        _manual_call(config, transformer, 0)
    kwargs = {"batch": 2} if change == "batch" else {"tokens": 16}
    with pytest.raises(EngineError, match="Input shapes changed within a run on branch 'cond' at step 1"):
        with invardiff.cache_context(transformer, "cond", step_index=1):
            _manual_call(config, transformer, 1, **kwargs)
    # The failed branch was dropped: continuing at step 2 is refused, a fresh run at step 0 works.
    with pytest.raises(EngineError, match="got step 2 after no step yet"):
        with invardiff.cache_context(transformer, "cond", step_index=2):
            _manual_call(config, transformer, 2)
    with invardiff.cache_context(transformer, "cond", step_index=0):
        _manual_call(config, transformer, 0, **kwargs)


def test_calls_that_do_not_follow_the_scheduler_are_an_error():
    config, pipe = tiny_pipeline("dit")
    invardiff.enable(pipe, invardiff.CachePlan.reuse_nothing(facts_for(pipe.transformer, "dit"), 8))
    pipe.scheduler.set_timesteps(8)
    timesteps = pipe.scheduler.timesteps  # DDIM, 8 steps: 875, 750, ..., 0
    call = config.example_call()
    call["timestep"] = timesteps[1].repeat(2)  # step 1's timestep as the first call of the run
    with pytest.raises(
        EngineError,
        match="has timestep 750, but the scheduler's schedule says step 0 "
        r"\(timestep 875\)",
    ):
        pipe.transformer(**call)


def test_disable_restores_bit_identity_after_a_reusing_run():
    config, pipe = tiny_pipeline("dit")
    stock = run_pipeline(pipe, config, 8)
    weights = copy.deepcopy(pipe.transformer.state_dict())
    plan = plan_from_bits(
        facts_for(pipe.transformer, "dit"),
        "00110110",
        {"transformer_blocks": {"attn": ["00"] + ["11"] * 6 + ["00"], "ff": ["00"] * 8}},
    )
    with invardiff.enabled(pipe, plan):
        cached = run_pipeline(pipe, config, 8)
    assert not torch.equal(cached, stock)
    assert torch.equal(run_pipeline(pipe, config, 8), stock)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())  # weights untouched
