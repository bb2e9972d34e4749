"""LTX-2 beyond the conformance kit (which runs its toy ``LTX2Pipeline`` with classifier-free guidance alone): the
pipeline's default three calls per step (CFG, spatio-temporal guidance, modality isolation), plan+probe, calibration
recording, extrapolated plans and the fixed-interval policy on the packed video-and-audio pre-head state
(``FamilySpec.head_streams``), and the CLI's budgeted search."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

import invardiff
from invardiff import CachePlan
from invardiff.cache_footprint import measure_footprint
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.recording import recording
from invardiff.cli.main import main
from invardiff.families import TransformerCall, get_family
from invardiff.families.model_config import video_pipeline_size
from invardiff.families.spec import pre_head_capture
from invardiff.flops import profile_flops
from invardiff.stats import ideal_speedup
from invardiff.toy_pipelines import build_pipeline

from helpers import (
    ReferenceExecutor,
    branch_loop,
    facts_for,
    plan_from_bits,
    random_plan,
    run_pipeline,
    tiny_config,
    tiny_pipeline,
)


T = 6
EPS = 1e-8  # the recorder's default epsilon


def _setup():
    config = tiny_config("ltx2")
    transformer = config.build_transformer()
    return transformer, {"default": config.example_call()}


def _run(transformer, calls, config=None):
    if config is None:
        return branch_loop(transformer, "ltx2", calls, T)["default"], None
    with invardiff.enabled(transformer, config):
        latents = branch_loop(transformer, "ltx2", calls, T)["default"]
        return latents, invardiff.summary(transformer).branches["default"]


def test_plan_probe_vetoes_or_accepts_the_plans_step_reuse_on_both_streams():
    transformer, calls = _setup()
    plan = plan_from_bits(facts_for(transformer, "ltx2"), "001011")
    stock, _ = _run(transformer, calls)
    planned, _ = _run(transformer, calls, plan)
    # At delta 0 every reuse is vetoed: every step computes, as stock, bit for bit (video and audio latents).
    vetoed, branch = _run(transformer, calls, invardiff.PlanProbeConfig(plan, threshold=0.0))
    assert torch.equal(vetoed, stock)
    decisions = [row[0] for row in branch.to_dict()["probe"]["decision"]]
    assert [d for d, cached in zip(decisions, plan.step_cache, strict=True) if cached] == ["vetoed"] * 3
    # At a huge delta every reuse is accepted: the deep blocks are skipped and the kept packed state reaches both
    # heads through the last block, which must give the plan's own step-cached steps bit for bit.
    accepted, branch = _run(transformer, calls, invardiff.PlanProbeConfig(plan, threshold=1e9))
    assert [row[0] for row in branch.to_dict()["probe"]["decision"]].count("plan_reuse") == 3
    assert torch.equal(accepted, planned)
    assert not torch.equal(planned, stock)


def test_calibration_records_the_step_rate_of_the_packed_video_and_audio_state():
    transformer, calls = _setup()
    spec = get_family("ltx2")
    handles, read = pre_head_capture(spec, transformer)  # plain hooks on norm_out and audio_norm_out
    features = []
    handles.append(transformer.register_forward_hook(lambda module, args, output: features.append(read().clone())))
    try:
        _run(transformer, calls)
    finally:
        for handle in handles:
            handle.remove()
    video_tokens = calls["default"]["hidden_states"].shape[1] * transformer.proj_in.out_features
    assert features[0].shape == (2, video_tokens + 5 * transformer.audio_proj_in.out_features)
    with recording(transformer, facts_for(transformer, "ltx2"), T) as recorder:
        _run(transformer, calls)
    step, _ = recorder.rates()
    assert step.shape == (2, T)  # one run per sample of the batch
    for sample in range(2):
        row = [f[sample] for f in features]
        expected = [np.nan] + [
            (row[j + 1] - row[j]).abs().sum().item() / ((row[j] - row[j - 1]).abs().sum().item() + EPS)
            for j in range(1, T - 1)
        ] + [np.nan]  # fmt: skip
        np.testing.assert_allclose(step[sample], expected, rtol=1e-5)


def test_the_flop_profile_and_the_memory_footprint_count_both_streams_of_the_pre_head_state():
    config = tiny_config("ltx2")  # batch 2; video 8 tokens x 16, audio 5 tokens x 8
    assert profile_flops(config).step_elements == 2 * (8 * 16 + 5 * 8)
    assert measure_footprint(config).hidden[0] == 2 * (8 * 16 + 5 * 8)


# ----- the stock pipeline's three calls per step -----------------------------------------------------------------
# LTX2Pipeline's defaults: CFG (one batched call), spatio-temporal guidance (block 1's self-attention perturbed: the
# tiny model has 2 blocks) and modality isolation (no audio-video attention), each a call of its own per step.
THREE_CALLS = {"stg_scale": 1.0, "modality_scale": 3.0, "spatio_temporal_guidance_blocks": [1]}
BRANCHES = ["cond_uncond", "uncond_stg", "uncond_modality"]


def test_the_pipelines_cfg_stg_and_modality_calls_are_one_branch_each():
    config, pipe = tiny_pipeline("ltx2")
    calls = []  # (rows, STG blocks, modalities isolated) of each transformer call

    def record(module, args, kwargs):
        blocks = kwargs["spatio_temporal_guidance_blocks"]
        calls.append((kwargs["hidden_states"].shape[0], blocks, kwargs["isolate_modalities"]))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    stock = run_pipeline(pipe, config, 4, **THREE_CALLS)
    handle.remove()
    assert calls == [(2, None, False), (1, [1], False), (1, None, True)] * 4
    plan = random_plan(facts_for(pipe.transformer, "ltx2"), 4, seed=0)

    def reference(share_branches):  # the plan executed the plain way, each of the 3 calls of a step one branch
        clone = copy.deepcopy(pipe.transformer)
        ReferenceExecutor(clone, plan, "ltx2", branches_per_step=3, share_branches=share_branches)
        return run_pipeline(build_pipeline(config, clone), config, 4, **THREE_CALLS)

    with invardiff.enabled(pipe, plan):
        actual = run_pipeline(pipe, config, 4, **THREE_CALLS)
        branches = invardiff.summary(pipe).branches
    assert sorted(branches) == sorted(BRANCHES)
    for branch in branches.values():
        assert branch.step_status.tolist() == plan.step_cache.astype(int).tolist()
    assert torch.equal(actual, reference(share_branches=False))
    assert not torch.equal(actual, stock)
    assert not torch.equal(reference(share_branches=True), actual)  # the control: one cache for the 3 calls differs


# ----- extrapolated plans and the interval policy on the packed state --------------------------------------------
T_FIXED = 5


def _fixed_calls():
    """One call per step with fixed latents (so a reused step's expected output is a function of the stock H of
    the computed steps alone), the timestep falling."""
    call = tiny_config("ltx2").example_call(seed=1)
    return [{**call, "timestep": torch.full((2,), 1000.0 * (1 - step / T_FIXED))} for step in range(T_FIXED)]


def _outputs(transformer, config, calls):
    outputs = []
    with invardiff.enabled(transformer, config):
        for step, call in enumerate(calls):
            with invardiff.cache_context(transformer, "default", step_index=step):
                outputs.append(transformer(**call))
    return outputs


def _stock_states(transformer, calls):
    """The stock packed pre-head state H of every call, and every call's (video, audio) output."""
    handles, read = pre_head_capture(get_family("ltx2"), transformer)
    states, outputs = [], []
    try:
        for call in calls:
            outputs.append(transformer(**call))
            states.append(read().clone())
    finally:
        for handle in handles:
            handle.remove()
    return states, outputs


def _head(transformer, hidden, call):
    # The call as the engine sees it (every argument bound, defaults included).
    return get_family("ltx2").run_head(
        transformer, hidden, TransformerCall(inspect.signature(transformer.forward), (), call)
    )


def _assert_streams_close(actual, expected):
    # float32: the lerp's and the head's rounding (the expected H is formed in float64, then cast).
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_an_extrapolated_step_runs_both_heads_on_the_extrapolated_packed_state():
    transformer = tiny_config("ltx2").build_transformer()
    calls = _fixed_calls()
    H, stock = _stock_states(transformer, calls)
    plan = plan_from_bits(facts_for(transformer, "ltx2"), "00110")
    coefficients = np.array([0.0, 0.0, 0.7, 1.4, 0.0])
    extrapolating = CachePlan(plan.model, T_FIXED, plan.step_cache, plan.module_reuse, step_extrapolation=coefficients)
    outputs = _outputs(transformer, extrapolating, calls)
    for step in (0, 1):  # computed: stock
        assert all(torch.equal(a, b) for a, b in zip(outputs[step], stock[step], strict=True))
    for step in (2, 3):  # both heads on H_1 + c (H_1 - H_0): the video and the audio output
        hidden = (H[1].double() + coefficients[step] * (H[1].double() - H[0].double())).float()
        _assert_streams_close(outputs[step], _head(transformer, hidden, calls[step]))
    plain = _outputs(transformer, plan, calls)
    for step in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(plain[step], _head(transformer, H[1], calls[step]), strict=True))
        assert not torch.allclose(outputs[step][1], plain[step][1], atol=1e-4)  # the audio stream extrapolated too


@torch.no_grad()
def test_an_extrapolated_unit_is_its_last_two_computed_outputs_extrapolated():
    transformer = tiny_config("ltx2").build_transformer()
    calls = _fixed_calls()
    seen = []  # block 1's audio-to-video attention output (queries video, keys and values audio) at every call
    handle = transformer.transformer_blocks[1].audio_to_video_attn.register_forward_hook(
        lambda module, args, output: seen.append(output.clone())
    )
    rows = {"a2v_attn": ["00", "00", "01", "01", "00"]}
    plan = plan_from_bits(facts_for(transformer, "ltx2"), "00000", {"transformer_blocks": rows})
    coefficients = {kind: np.zeros((T_FIXED, 2)) for kind in plan.module_reuse["transformer_blocks"]}
    coefficients["a2v_attn"][2, 1], coefficients["a2v_attn"][3, 1] = 0.5, 1.0
    extrapolating = CachePlan(
        plan.model,
        T_FIXED,
        plan.step_cache,
        plan.module_reuse,
        unit_extrapolation={"transformer_blocks": coefficients},
    )
    try:
        _outputs(transformer, extrapolating, calls)
    finally:
        handle.remove()
    z0, z1 = seen[0].double(), seen[1].double()
    for step, c in ((2, 0.5), (3, 1.0)):
        torch.testing.assert_close(seen[step], (z1 + c * (z1 - z0)).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", [0, 1])
@torch.no_grad()
def test_the_interval_policy_reuses_or_extrapolates_the_packed_state(order):
    transformer = tiny_config("ltx2").build_transformer()
    calls = _fixed_calls()
    H, stock = _stock_states(transformer, calls)
    config = invardiff.IntervalConfig(interval=2, warmup_steps=1, order=order, num_inference_steps=T_FIXED)
    outputs = _outputs(transformer, config, calls)  # computes steps 0, 1, 3 and the last, 4; reuses step 2
    for step in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(outputs[step], stock[step], strict=True))
    # Step 2: H_1 (order 0) or H_1 + (2 - 1) / (1 - 0) (H_1 - H_0) (order 1), through both heads.
    hidden = H[1] if order == 0 else (H[1].double() + (H[1].double() - H[0].double())).float()
    _assert_streams_close(outputs[2], _head(transformer, hidden, calls[2]))
    if order == 0:  # the same as a plan that step-caches step 2, bit for bit
        plan = plan_from_bits(facts_for(transformer, "ltx2"), "00100")
        planned = _outputs(transformer, plan, calls)
        assert all(torch.equal(a, b) for x, y in zip(outputs, planned, strict=True) for a, b in zip(x, y, strict=True))


# ----- the budgeted search, through the CLI on the toy pipeline (tiny Gemma 3 text stack) --------------------------
@pytest.mark.slow
def test_calibrate_budget_writes_an_extrapolating_plan_within_the_budget_that_runs_deterministically(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    argv = ["calibrate", "--model-config", "ltx2-tiny", "--prompts", str(tmp_path / "prompts.txt"), "--steps", "10"]
    assert main([*argv, "--budget", "2x", "--extrapolate", "both", "-o", str(tmp_path / "plan.json")]) == 0
    plan = CachePlan.load(tmp_path / "plan.json")
    config, pipe = tiny_pipeline("ltx2")
    # What the CLI sampled: the config's clip size (9 frames of 64x64 at 24 fps: 9 audio latents), 1024 text tokens.
    call = {"num_inference_steps": 10, **video_pipeline_size(config)}
    flops = profile_flops(pipeline_call_config(pipe, "ltx2", call))
    speedup = ideal_speedup(plan, flops)
    full_step_share = (flops.full_step - flops.step_cached) / (10 * flops.full_step)  # one step's worth
    assert speedup >= 2.0 and 1 / speedup >= 1 / 2.0 - full_step_share
    assert plan.extrapolates
    with invardiff.enabled(pipe, plan):
        first = run_pipeline(pipe, config, 10, **THREE_CALLS)
        second = run_pipeline(pipe, config, 10, **THREE_CALLS)
    assert torch.equal(first, second) and not torch.equal(first, run_pipeline(pipe, config, 10, **THREE_CALLS))


# ----- context parallelism: refused, by name, before any collective ----------------------------------------------
def test_context_parallelism_is_refused_naming_the_streams_it_would_shard_unevenly(tmp_path):
    import torch.distributed as dist

    from invardiff.scale.distributed import enable_context_parallel

    transformer = tiny_config("ltx2").build_transformer()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        for config in (invardiff.DiCacheConfig(threshold=0.1, num_inference_steps=4), plan_from_bits(
            facts_for(transformer, "ltx2"), "0010"
        )):  # fmt: skip
            with pytest.raises(NotImplementedError) as error:
                enable_context_parallel(transformer, config, group)
            message = str(error.value)
            assert "'ltx2' family" in message
            assert "streams hidden_states, audio_hidden_states" in message and "shards hidden_states and" in message
            assert not invardiff.is_enabled(transformer)
    finally:
        dist.destroy_process_group()
