"""The engine on stock tiny diffusers pipelines: identity, exactness against a reference, counts, lifecycle."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import invardiff
from invardiff.stats import unit_reuse

from helpers import (
    assert_close_reason,
    facts_for,
    plan_from_bits,
    reference_pipeline,
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
def test_reuse_nothing_is_bit_identical_and_disable_restores(family):
    config, pipe = tiny_pipeline(family)
    plan = invardiff.CachePlan.reuse_nothing(facts_for(pipe.transformer, family), T)
    stock = run_pipeline(pipe, config, T)
    invardiff.enable(pipe, plan)
    cached = run_pipeline(pipe, config, T)
    invardiff.disable(pipe)
    after = run_pipeline(pipe, config, T)
    assert torch.equal(cached, stock)
    assert torch.equal(after, stock)


@pytest.mark.parametrize("family", ["flux", "dit"])
@pytest.mark.parametrize("kind", ["step_only", "modules_only", "both"])
def test_plan_equals_reference_computation(family, kind):
    config, pipe = tiny_pipeline(family)
    facts = facts_for(pipe.transformer, family)
    step_cache = STEP_ONLY if kind != "modules_only" else "0" * T
    plan = plan_from_bits(facts, step_cache, None if kind == "step_only" else _modules(family))
    stock = run_pipeline(pipe, config, T)
    expected = run_pipeline(reference_pipeline(config, pipe.transformer, plan), config, T)
    with invardiff.enabled(pipe, plan):
        actual = run_pipeline(pipe, config, T)
    assert_close_reason(actual, expected)
    assert (actual - stock).abs().max() > 1e-4  # the plan really changed the computation


def _unit_flops_per_call(transformer, call):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        transformer(**call)
    return {name.split(".", 1)[1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." in name}


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_module_executions_match_the_plan(family):
    config, pipe = tiny_pipeline(family)
    facts = facts_for(pipe.transformer, family)
    plan = plan_from_bits(facts, STEP_ONLY, _modules(family))
    stock_transformer = copy.deepcopy(pipe.transformer)
    per_call = _unit_flops_per_call(stock_transformer, config.example_call())
    invardiff.enable(pipe, plan)
    counter = FlopCounterMode(display=False)
    with counter:
        run_pipeline(pipe, config, T)
    counted = {
        name.split(".", 1)[1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." in name
    }
    summary = invardiff.summary(pipe)
    invardiff.disable(pipe)

    family_spec = invardiff.families.get_family(family)
    executed = ~plan.step_cache
    for block_list in family_spec.block_lists:
        for unit, reuse in unit_reuse(plan, block_list.attr).items():
            expected_runs = (executed[:, None] & ~reuse).sum(axis=0)  # (L,) computations per layer
            spec = next(u for u in block_list.units if u.name == unit)
            for layer, runs in enumerate(expected_runs):
                key = f"{block_list.attr}.{layer}.{spec.module}"
                assert per_call[key] > 0
                assert counted.get(key, 0) == runs * per_call[key], key
            counts = summary.branches[next(iter(summary.branches))].counts()[block_list.attr][unit]
            assert counts["computed"] == int(expected_runs.sum())
            assert counts["reused"] == int((executed[:, None] & reuse).sum())


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


def test_flux_true_cfg_keeps_separate_branch_state():
    config, pipe = tiny_pipeline("flux")
    plan = plan_from_bits(facts_for(pipe.transformer, "flux"), STEP_ONLY, FLUX_MODULES)
    negative = torch.randn(1, config.text_tokens, 32, generator=torch.Generator().manual_seed(5))
    extra = {
        "true_cfg_scale": 2.0,
        "negative_prompt_embeds": negative,
        "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(6)),
    }
    expected = run_pipeline(
        reference_pipeline(config, pipe.transformer, plan, branches_per_step=2), config, T, **extra
    )
    with invardiff.enabled(pipe, plan):
        actual = run_pipeline(pipe, config, T, **extra)
        summary = invardiff.summary(pipe)
    assert_close_reason(actual, expected)
    assert sorted(summary.branches) == ["cond", "uncond"]
    for branch in summary.branches.values():
        assert branch.step_status.tolist() == [int(c) for c in STEP_ONLY]


def test_batched_cfg_dit_shares_one_state_and_counts_both_halves():
    config, pipe = tiny_pipeline("dit")
    plan = plan_from_bits(facts_for(pipe.transformer, "dit"), STEP_ONLY, DIT_MODULES)
    with invardiff.enabled(pipe, plan):
        run_pipeline(pipe, config, T, class_labels=[1, 2])
        summary = invardiff.summary(pipe)
    assert list(summary.branches) == ["default"]
    assert summary.branches["default"].step_status.tolist() == [int(c) for c in STEP_ONLY]


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
