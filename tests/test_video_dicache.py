"""DiCache on the Wan and HunyuanVideo transformers: per sample equals each sample alone (HunyuanVideo's samples have
different text padding, so the attention mask is cut with them), batch-global decisions, the official presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import invardiff
from invardiff.dicache import PRESETS

from helpers import (
    T_PROBE,
    batched_call,
    dicache_where_samples_disagree,
    euler_loop,
    probe_decisions,
    row_of,
    run_pipeline,
    tiny_pipeline,
)


FAMILIES = ["wan", "hunyuanvideo"]


def test_hunyuanvideo_example_samples_have_different_masks():
    _, _, call = batched_call("hunyuanvideo")
    mask = call["encoder_attention_mask"]
    assert mask.sum(dim=1).tolist() == [6.0, 4.0]  # 8 text tokens: 2 and 4 of them padding


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_decisions_equal_each_sample_run_alone(family):
    transformer, call, config, alone = dicache_where_samples_disagree(family)
    batched, branch = euler_loop(transformer, family, call, config)
    decisions = probe_decisions(branch)
    assert [row[0] for row in decisions] == [row[0] for row in alone[0]]
    assert [row[1] for row in decisions] == [row[0] for row in alone[1]]
    assert any(row[0] != row[1] for row in decisions)  # a step where one skips and the other computes
    for i in range(2):
        solo, _ = euler_loop(transformer, family, row_of(call, i), config)
        # A batch of two and a batch of one take different matmul paths: float32 rounding only.
        torch.testing.assert_close(batched[i : i + 1], solo, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["wan", pytest.param("hunyuanvideo", marks=pytest.mark.slow)])
def test_batch_global_decision_is_shared_and_uses_batch_means(family):
    _, transformer, call = batched_call(family)
    config = invardiff.DiCacheConfig(threshold=0.3, num_inference_steps=T_PROBE, warmup_ratio=0.1, per_sample=False)
    _, branch = euler_loop(transformer, family, call, config)
    decisions = np.array(probe_decisions(branch))
    assert (decisions[:, 0] == decisions[:, 1]).all()
    assert "skipped" in decisions[:, 0]
    error = branch.probe["error"]
    measured = ~np.isnan(error[:, 0])
    assert (error[measured, 0] == error[measured, 1]).all()


def test_families_default_to_their_official_presets():
    assert invardiff.families.get_family("wan").dicache_preset == "wan2.1"
    assert invardiff.families.get_family("hunyuanvideo").dicache_preset == "hunyuanvideo"
    wan, hunyuan = PRESETS["wan2.1"], PRESETS["hunyuanvideo"]
    assert (wan.threshold, wan.gamma_max, wan.skip_when, wan.warmup_inclusive) == (0.08, 2.0, "<", False)
    hunyuan_rules = (hunyuan.threshold, hunyuan.gamma_max, hunyuan.skip_when, hunyuan.force_last_step)
    assert hunyuan_rules == (0.1, 1.5, "<=", False)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_branches_keep_their_own_accumulators(family):
    # cond and uncond are separate calls (WanPipeline, HunyuanVideoPipeline with true CFG): each branch has its own
    # probe references and accumulator, so their errors differ; threshold 0 computes every step (bit identity).
    config, pipe = tiny_pipeline(family)
    stock = run_pipeline(pipe, config, T_PROBE)
    with invardiff.enabled(pipe, invardiff.DiCacheConfig(threshold=0.0)):
        assert torch.equal(run_pipeline(pipe, config, T_PROBE), stock)
    with invardiff.enabled(pipe, invardiff.DiCacheConfig.preset(get_preset(family), threshold=1.0)):
        cached = run_pipeline(pipe, config, T_PROBE)
        branches = invardiff.summary(pipe).branches
    assert sorted(branches) == ["cond", "uncond"]
    assert not np.array_equal(branches["cond"].probe["error"], branches["uncond"].probe["error"], equal_nan=True)
    for branch in branches.values():
        assert "skipped" in [row[0] for row in probe_decisions(branch)]
        # Official warm-up of the video presets at T = 10 (no "<=", no forced last step): steps 0-1 in each branch
        # (HunyuanVideo: step < floor(0.2 T) = 2; Wan: call 2k + branch < floor(0.2 * 2T) = 4). Per-branch
        # boundaries that differ (T = 13) are checked against the official code in test_dicache_official.py.
        assert [row[0] for row in probe_decisions(branch)][:2] == ["warmup", "warmup"]
    assert not torch.equal(cached, stock)


def get_preset(family: str) -> str:
    return invardiff.families.get_family(family).dicache_preset
