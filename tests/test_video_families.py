"""Wan2.2's two experts through the stock WanPipeline (tiny random weights), and calibration on a video config's clip
size. Identity, exactness against the reference executor, FLOPs and CFG branches of every family, the video ones
included, are the conformance kit's (test_family_conformance.py)."""

from __future__ import annotations

import json

import pytest
import torch

import invardiff
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline

from helpers import (
    assert_close_reason,
    expert_reference_pipeline,
    facts_for,
    plan_from_bits,
    run_pipeline,
)


T = 6


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

    reference = expert_reference_pipeline(pipe, plans)
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


# The HunyuanVideo toy pipeline has no text encoders; LTX-Video and Allegro have VAEs of their own compression.
@pytest.mark.parametrize("name", ["wan-tiny", "ltx-tiny", "allegro-tiny"])
def test_calibrate_on_a_video_model_config_samples_its_clip_size(name, tmp_path):
    # Without the config's size the toy pipeline would sample its default (81 frames of 480p): hours on a CPU.
    from invardiff.cli.main import main
    from invardiff.families.model_config import video_pipeline_size

    (tmp_path / "prompts.txt").write_text("a cat\n")
    argv = ["calibrate", "--model-config", name, "--prompts", str(tmp_path / "prompts.txt"), "--steps", "6"]
    assert main([*argv, "--thresholds", "step=0.5", "-o", str(tmp_path / "p.json")]) == 0
    recorded = json.loads((tmp_path / "p.json").read_text())["provenance"]["calibration"]["pipeline_kwargs"]
    assert {k: recorded[k] for k in ("height", "width", "num_frames")} == video_pipeline_size(MODEL_CONFIGS[name])
