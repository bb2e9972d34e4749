"""Wan and HunyuanVideo through their stock diffusers pipelines (tiny random weights, classifier-free guidance as
separate cond / uncond calls): identity, exactness against the reference executor, FLOPs, branches, Wan2.2 experts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import invardiff
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.stats import unit_reuse
from invardiff.toy_pipelines import build_pipeline

from helpers import (
    ReferenceExecutor,
    assert_close_reason,
    facts_for,
    plan_from_bits,
    reference_pipeline,
    run_pipeline,
    tiny_pipeline,
)


T = 6
FAMILIES = ["wan", pytest.param("hunyuanvideo", marks=pytest.mark.slow)]  # the slower toy
STEP_ONLY = "001101"


def _module_plan(transformer, family, step_cache=STEP_ONLY):
    # Every kind reuses a different pattern of layers at steps 1, 2, 4 and 5; Hunyuan's attn and context_attn differ
    # at step 4 (the joint attention must then compute: AND).
    facts = facts_for(transformer, family)
    reuse = {}
    for block in facts.block_lists:
        L = block.num_layers
        reuse[block.name] = {}
        for index, kind in enumerate(block.module_kinds):
            pattern = [(layer + index) % 2 == 0 for layer in range(L)]
            row = "".join("1" if bit else "0" for bit in pattern)
            other = "".join("0" if bit else "1" for bit in pattern)
            rows = ["0" * L, row, "1" * L, "0" * L, other if kind == "context_attn" else row, other]
            reuse[block.name][kind] = rows
    return plan_from_bits(facts, step_cache, reuse)


@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_nothing_is_bit_identical_and_disable_restores(family):
    config, pipe = tiny_pipeline(family)
    plan = invardiff.CachePlan.reuse_nothing(facts_for(pipe.transformer, family), T)
    stock = run_pipeline(pipe, config, T)
    invardiff.enable(pipe, plan)
    cached = run_pipeline(pipe, config, T)
    branches = sorted(invardiff.summary(pipe).branches)
    invardiff.disable(pipe)
    after = run_pipeline(pipe, config, T)
    assert branches == ["cond", "uncond"]  # CFG ran as two calls per step
    assert torch.equal(cached, stock)
    assert torch.equal(after, stock)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["step_only", "modules_only", "both"])
def test_plan_equals_reference_computation(family, kind):
    config, pipe = tiny_pipeline(family)
    if kind == "step_only":
        plan = plan_from_bits(facts_for(pipe.transformer, family), STEP_ONLY)
    else:
        plan = _module_plan(pipe.transformer, family, STEP_ONLY if kind == "both" else "0" * T)
    stock = run_pipeline(pipe, config, T)
    expected = run_pipeline(reference_pipeline(config, pipe.transformer, plan, branches_per_step=2), config, T)
    with invardiff.enabled(pipe, plan):
        actual = run_pipeline(pipe, config, T)
    assert_close_reason(actual, expected)
    assert (actual - stock).abs().max() > 1e-4  # the plan really changed the computation


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cond_and_uncond_states_never_mix(family):
    # The branches differ (prompt vs negative embeddings): a reference that shared one cache between them (one
    # cache) gives another result, and the engine matches the one that keeps them apart.
    config, pipe = tiny_pipeline(family)
    plan = _module_plan(pipe.transformer, family)
    separate = run_pipeline(reference_pipeline(config, pipe.transformer, plan, branches_per_step=2), config, T)
    mixed = run_pipeline(reference_pipeline(config, pipe.transformer, plan, 2, share_branches=True), config, T)
    with invardiff.enabled(pipe, plan):
        actual = run_pipeline(pipe, config, T)
        summary = invardiff.summary(pipe)
    assert (separate - mixed).abs().max() > 1e-4
    assert_close_reason(actual, separate)
    for branch in summary.branches.values():
        assert branch.step_status.tolist() == [int(c) for c in STEP_ONLY]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_module_executions_match_the_plan(family):
    config, pipe = tiny_pipeline(family)
    plan = _module_plan(pipe.transformer, family)
    per_call = _unit_flops_per_call(copy.deepcopy(pipe.transformer), config.example_call())
    invardiff.enable(pipe, plan)
    counter = FlopCounterMode(display=False)
    with counter:
        run_pipeline(pipe, config, T)
    counted = {
        name.split(".", 1)[1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." in name
    }
    summary = invardiff.summary(pipe)
    invardiff.disable(pipe)
    executed = ~plan.step_cache
    for block_list in invardiff.families.get_family(family).block_lists:
        for unit, reuse in unit_reuse(plan, block_list.attr).items():
            runs = (executed[:, None] & ~reuse).sum(axis=0)  # (L,) computations per layer and branch
            spec = next(u for u in block_list.units if u.name == unit)
            for layer, count in enumerate(runs):
                key = f"{block_list.attr}.{layer}.{spec.module}"
                assert per_call[key] > 0
                assert counted.get(key, 0) == 2 * count * per_call[key], key  # cond and uncond
            for branch in summary.branches.values():
                counts = branch.counts()[block_list.attr][unit]
                assert counts["computed"] == int(runs.sum())
                assert counts["reused"] == int((executed[:, None] & reuse).sum())


def _unit_flops_per_call(transformer, call):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        transformer(**call)
    return {name.split(".", 1)[1]: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." in name}


# ----- Wan2.2: two experts switched at boundary_ratio -----
def _two_expert_pipeline(boundary=0.9):
    config = MODEL_CONFIGS["wan-tiny"]
    high, low = config.build_transformer(seed=0), config.build_transformer(seed=1)
    pipe = build_pipeline(config, high)
    pipe = type(pipe)(**{**pipe.components, "transformer_2": low}, boundary_ratio=boundary)
    pipe.set_progress_bar_config(disable=True)
    return config, pipe


def _expert_steps(pipe):
    pipe.scheduler.set_timesteps(T)
    high = int((pipe.scheduler.timesteps >= pipe.config.boundary_ratio * 1000).sum())
    return high, T - high


def test_wan22_single_plan_is_refused_with_how_to_pass_two():
    config, pipe = _two_expert_pipeline()
    plan = invardiff.CachePlan.reuse_nothing(facts_for(pipe.transformer, "wan"), T)
    with pytest.raises(
        ValueError, match=r"invardiff.enable\(pipe, \{'transformer': \.\.\., 'transformer_2': \.\.\.\}\)"
    ):
        invardiff.enable(pipe, plan)
    with pytest.raises(ValueError, match="Pass one per transformer"):
        invardiff.enable(pipe, {"transformer": plan})
    assert not invardiff.is_enabled(pipe)


@pytest.mark.parametrize("kind", ["plan", "dicache"])
def test_wan22_step_count_error_names_the_expert_and_its_own_count(kind):
    # The pipeline call has T steps; transformer_2 runs only its part of them, so "call the pipeline with
    # num_inference_steps=T" would be no fix: the message names the expert, its count and the count it needs.
    config, pipe = _two_expert_pipeline()
    high_steps, low_steps = _expert_steps(pipe)
    facts = facts_for(pipe.transformer, "wan")
    if kind == "plan":
        configs = {
            "transformer": invardiff.CachePlan.reuse_nothing(facts, high_steps),
            "transformer_2": invardiff.CachePlan.reuse_nothing(facts, T),
        }
        error_type = invardiff.PlanError
    else:
        configs = {
            "transformer": invardiff.DiCacheConfig(threshold=0.1),
            "transformer_2": invardiff.DiCacheConfig(threshold=0.1, num_inference_steps=T),
        }
        error_type = invardiff.EngineError
    with invardiff.enabled(pipe, configs):
        with pytest.raises(error_type) as raised:
            run_pipeline(pipe, config, T)
    message = str(raised.value)
    assert f"of transformer_2 is for {T} steps" in message
    assert f"this pipeline call of {T} steps gives transformer_2 {low_steps} of them" in message
    assert f"a plan or config for {low_steps} steps" in message
    assert f"num_inference_steps={T}" not in message


@pytest.mark.slow
def test_wan22_each_expert_follows_its_own_plan():
    config, pipe = _two_expert_pipeline()
    high_steps, low_steps = _expert_steps(pipe)
    assert high_steps >= 2 and low_steps >= 2  # the boundary splits this schedule
    facts = facts_for(pipe.transformer, "wan")
    # The high-noise expert step-caches after its first two steps; the low-noise one reuses ffn layer-wise only.
    low_reuse = ["00"] + ["10", "11", "01", "11", "10"][: low_steps - 1]
    plans = {
        "transformer": plan_from_bits(facts, "00" + "1" * (high_steps - 2)),
        "transformer_2": plan_from_bits(facts, "0" * low_steps, {"blocks": {"ffn": low_reuse}}),
    }
    stock = run_pipeline(pipe, config, T)
    nothing = {name: invardiff.CachePlan.reuse_nothing(facts, len(plan.step_cache)) for name, plan in plans.items()}
    with invardiff.enabled(pipe, nothing):
        assert torch.equal(run_pipeline(pipe, config, T), stock)

    reference = type(pipe)(**pipe.components, boundary_ratio=pipe.config.boundary_ratio)
    reference.set_progress_bar_config(disable=True)
    for name, plan in plans.items():
        clone = copy.deepcopy(getattr(pipe, name))
        ReferenceExecutor(clone, plan, "wan", branches_per_step=2)
        reference.register_modules(**{name: clone})
    expected = run_pipeline(reference, config, T)
    with invardiff.enabled(pipe, plans):
        actual = run_pipeline(pipe, config, T)
        summaries = {name: invardiff.summary(getattr(pipe, name)) for name in plans}
        with pytest.raises(ValueError, match="one engine per transformer"):
            invardiff.summary(pipe)
    assert not invardiff.is_enabled(pipe)
    assert_close_reason(actual, expected)
    assert (actual - stock).abs().max() > 1e-4
    for name, plan in plans.items():
        for branch in summaries[name].branches.values():
            assert branch.step_status.tolist() == plan.step_cache.astype(int).tolist()
    ffn = summaries["transformer_2"].branches["cond"].counts()["blocks"]["ffn"]
    assert ffn["reused"] == sum(row.count("1") for row in low_reuse)


@pytest.mark.parametrize("name", ["wan-tiny"])  # the HunyuanVideo toy pipeline has no text encoders
def test_calibrate_on_a_video_model_config_samples_its_clip_size(name, tmp_path):
    # Without the config's size the toy pipeline would sample its default (81 frames of 480p): hours on a CPU.
    from invardiff.cli.main import main
    from invardiff.model_configs import video_pipeline_size

    (tmp_path / "prompts.txt").write_text("a cat\n")
    argv = ["calibrate", "--model-config", name, "--prompts", str(tmp_path / "prompts.txt"), "--steps", "6"]
    assert main([*argv, "--thresholds", "step=0.5", "-o", str(tmp_path / "p.json")]) == 0
    recorded = json.loads((tmp_path / "p.json").read_text())["provenance"]["calibration"]["pipeline_kwargs"]
    assert {k: recorded[k] for k in ("height", "width", "num_frames")} == video_pipeline_size(MODEL_CONFIGS[name])
