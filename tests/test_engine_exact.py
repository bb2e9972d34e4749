"""The engine on stock tiny diffusers pipelines: state across calls, cache memory. Identity, exactness against the
reference executor, FLOPs and CFG branches of every family are the conformance kit's (test_family_conformance.py)."""

import pytest
import torch

import invardiff

from helpers import (
    facts_for,
    plan_from_bits,
    run_pipeline,
    tiny_pipeline,
)


T = 8
# Hand-made plans for the tiny models (Flux: 2 dual + 4 single blocks; DiT: 2 blocks), T = 8 steps.
STEP_ONLY = "00110110"
FLUX_MODULES = {
    "transformer_blocks": {
        # attn and context_attn differ at step 3, layer 1: the joint attention must then be computed (AND).
        "attn": ["00", "00", "11", "11", "01", "00", "11", "00"],
        "context_attn": ["00", "00", "11", "10", "01", "00", "11", "00"],
        "ff": ["00", "11", "11", "00", "10", "11", "00", "00"],
        "context_ff": ["00", "01", "01", "01", "00", "00", "00", "00"],
    },
    "single_transformer_blocks": {
        "attn": ["0000", "1100", "1111", "0011", "0000", "1010", "0000", "0000"],
        "mlp": ["0000", "0011", "0011", "1100", "0000", "0101", "1111", "0000"],
    },
}
DIT_MODULES = {
    "transformer_blocks": {
        "attn": ["00", "10", "11", "01", "00", "11", "10", "00"],
        "ff": ["00", "01", "01", "11", "00", "10", "11", "00"],
    }
}


def _modules(family):
    return FLUX_MODULES if family == "flux" else DIT_MODULES


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_consecutive_calls_have_no_stale_state(family):
    config, pipe = tiny_pipeline(family)
    plan = plan_from_bits(facts_for(pipe.transformer, family), STEP_ONLY, _modules(family))
    invardiff.enable(pipe, plan)
    first = run_pipeline(pipe, config, T, seed=1)
    second = run_pipeline(pipe, config, T, seed=2)
    invardiff.disable(pipe)
    invardiff.enable(pipe, plan)
    fresh_second = run_pipeline(pipe, config, T, seed=2)
    invardiff.disable(pipe)
    assert torch.equal(second, fresh_second)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_peak_cache_bytes_follow_the_plan(family):
    config, pipe = tiny_pipeline(family)
    facts = facts_for(pipe.transformer, family)
    plans = {
        "nothing": invardiff.CachePlan.reuse_nothing(facts, T),
        "step": plan_from_bits(facts, STEP_ONLY),
        "modules": plan_from_bits(facts, STEP_ONLY, _modules(family)),
    }
    peaks = {}
    for name, plan in plans.items():
        with invardiff.enabled(pipe, plan):
            run_pipeline(pipe, config, T)
            summary = invardiff.summary(pipe)
            peaks[name] = summary.peak_cache_bytes
            assert summary.cache_bytes == 0  # nothing is held once the plan can no longer reuse it
            all_outputs = summary.all_outputs_bytes
    batch = 2 if family == "dit" else 1
    hidden_bytes = batch * (16 if family == "dit" else 64) * 32 * 4  # (B, N, D) float32 pre-head state
    assert peaks["nothing"] == 0
    assert peaks["step"] == hidden_bytes
    assert hidden_bytes < peaks["modules"] < all_outputs


def test_meta_device_memory_equals_a_real_run():
    from invardiff.bench.loop import Trajectory
    from invardiff.memory import cache_memory
    from invardiff.model_configs import MODEL_CONFIGS

    config = MODEL_CONFIGS["flux-tiny"]
    transformer = config.build_transformer()
    plan = plan_from_bits(facts_for(transformer, "flux"), STEP_ONLY, FLUX_MODULES)
    invardiff.enable(transformer, plan)
    trajectory = Trajectory(transformer, config, T, torch.device("cpu"))
    for step in range(T):
        trajectory.step(step)
    real = invardiff.summary(transformer)
    assert cache_memory(plan, config) == {
        "peak_cache_bytes": real.peak_cache_bytes,
        "all_outputs_bytes": real.all_outputs_bytes,
    }
    assert 0 < real.peak_cache_bytes < real.all_outputs_bytes
