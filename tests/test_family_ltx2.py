"""LTX-2 beyond the conformance kit, which runs it on the bare transformer (no toy pipeline) and so runs neither
plan+probe nor calibration recording on it: both read the packed video-and-audio pre-head state
(``FamilySpec.head_streams``) at the last block."""

from __future__ import annotations

import numpy as np
import torch

import invardiff
from invardiff.cache_footprint import measure_footprint
from invardiff.calibration.recording import recording
from invardiff.families import get_family
from invardiff.families.spec import pre_head_capture
from invardiff.flops import profile_flops

from helpers import branch_loop, facts_for, plan_from_bits, tiny_config


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
