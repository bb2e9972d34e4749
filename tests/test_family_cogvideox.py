"""CogVideoX beyond the conformance kit (which runs the 5b layout: rotary embeddings, 1-frame patches): the head and
the call shapes of the other layouts, CogVideoX1.5 (2-frame patches) and CogVideoX-2b (sin-cos positions)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import invardiff
from invardiff import CachePlan
from invardiff.families import TransformerCall, get_family
from invardiff.families.model_config import video_fields
from invardiff.toy_pipelines import build_pipeline

from helpers import branch_loop, facts_for, tiny_config


def _variant(latent, **kwargs):
    config = tiny_config("cogvideox")
    patch = (kwargs.get("patch_size_t") or 1, 2, 2)
    fields = video_fields(latent, patch)
    return dataclasses.replace(config, transformer_kwargs={**config.transformer_kwargs, **kwargs}, **fields)


VARIANTS = {
    "1.5": _variant(
        (4, 8, 8), patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81
    ),
    "2b": _variant(
        (2, 8, 8),
        use_rotary_positional_embeddings=False,
        sample_height=8,
        sample_width=8,
        sample_frames=5,
        max_text_seq_length=8,  # the positional table covers the padded prompt: the call's text length
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_head_reproduces_the_forward_output_bit_for_bit(variant):
    config = VARIANTS[variant]
    transformer = config.build_transformer()
    call = config.example_call(seed=1)
    captured = []
    handle = transformer.norm_final.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        (stock,) = transformer(**call)
        handle.remove()
        bound = TransformerCall(inspect.signature(transformer.forward), (), call)
        (head,) = get_family("cogvideox").run_head(transformer, captured[0], bound)
    assert stock.shape == call["hidden_states"].shape  # (B, F, C, H, W)
    assert torch.equal(head, stock)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_step_cached_plan_runs_through_the_engines_head_check(variant):
    # The engine checks at the first call that run_head on the head input reproduces the output (else SpecError);
    # a reuse-nothing plan then equals stock, and a plan that step-caches step 2 differs from it.
    config = VARIANTS[variant]
    transformer = config.build_transformer()
    call = {"default": config.example_call(seed=2)}
    stock = branch_loop(transformer, "cogvideox", call, 4)["default"]
    facts = facts_for(transformer, "cogvideox")
    with invardiff.enabled(transformer, CachePlan.reuse_nothing(facts, 4)):
        assert torch.equal(branch_loop(transformer, "cogvideox", call, 4)["default"], stock)
    plan = CachePlan.reuse_nothing(facts, 4)
    plan.step_cache[2] = True
    with invardiff.enabled(transformer, plan):
        cached = branch_loop(transformer, "cogvideox", call, 4)["default"]
        assert invardiff.summary(transformer).branches["default"].step_status.tolist() == [0, 0, 1, 0]
    assert not torch.equal(cached, stock)


def test_the_call_shape_of_cogvideox15_counts_the_padded_latent():
    # 1360x768, 81 frames: 21 latent frames, padded by the pipeline to 22 (whole 2-frame patches), of 96 x 170;
    # 11 x 48 x 85 tokens; the CFG branches batched: 2 rows.
    config = VARIANTS["1.5"]
    pipe = build_pipeline(config, config.build_transformer(device="meta"))
    shape = get_family("cogvideox").pipeline.call_shape(pipe, {"height": 768, "width": 1360, "num_frames": 81})
    assert shape["image_tokens"] == 11 * 48 * 85
    assert shape["extra"]["latent"] == (22, 96, 170)
    assert shape["batch"] == 2 and shape["text_tokens"] == 226
    unguided = get_family("cogvideox").pipeline.call_shape(pipe, {"num_frames": 49, "guidance_scale": 1.0})
    assert unguided["batch"] == 1
    assert unguided["extra"]["latent"] == (14, 300, 300)  # 13 frames padded to 14; the 2400 x 2400 default size
