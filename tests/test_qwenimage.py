"""Qwen-Image family specifics that the conformance kit (run on ``qwenimage-tiny``) does not see: the published config
and the refusal of ``zero_cond_t`` transformers (Qwen-Image-Edit-2511)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import invardiff
from invardiff.families import get_family
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.plan import CachePlan, ModelFacts


def test_the_published_config_is_the_20b_model():
    config = MODEL_CONFIGS["qwen-image"]
    transformer = config.build_transformer("meta")
    assert get_family(config.family).num_layers(transformer) == {"transformer_blocks": 60}
    assert transformer.inner_dim == 3072 and transformer.txt_in.in_features == 3584  # Qwen2.5-VL-7B's hidden size
    # Qwen-Image is announced as a 20B MMDiT.
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 1) == 20.4


@pytest.mark.parametrize("policy", ["plan", "dicache"])
def test_a_zero_cond_t_transformer_is_refused_at_enable(policy):
    tiny = MODEL_CONFIGS["qwenimage-tiny"]
    config = dataclasses.replace(tiny, transformer_kwargs={**tiny.transformer_kwargs, "zero_cond_t": True})
    transformer = config.build_transformer()
    steps = 4
    facts = ModelFacts.for_family("qwenimage", get_family("qwenimage").num_layers(transformer))
    cache = (
        CachePlan.reuse_nothing(facts, steps)
        if policy == "plan"
        else invardiff.DiCacheConfig(threshold=0.1, num_inference_steps=steps)
    )
    with pytest.raises(NotImplementedError, match=r"zero_cond_t=True \(Qwen-Image-Edit-2511\).*zero_cond_t=False"):
        invardiff.enable(transformer, cache)
    assert not invardiff.is_enabled(transformer)


def test_every_per_sample_block_argument_is_cut_with_the_samples():
    # A batch of 3 prompts with padding (the pipeline passes a mask when prompts differ in length): each block argument
    # with one row per sample must be in per_sample_args, or the deep blocks of some samples would get all rows' mask.
    config = dataclasses.replace(MODEL_CONFIGS["qwenimage-tiny"], batch=3)
    transformer = config.build_transformer()
    call = config.example_call()
    mask = torch.ones(3, config.text_tokens, dtype=torch.long)
    mask[1, -3:] = 0
    call["encoder_hidden_states_mask"] = mask
    seen = {}

    def record(module, args, kwargs):
        seen.update({name: value for name, value in kwargs.items() if torch.is_tensor(value) and value.shape[0] == 3})

    handle = transformer.transformer_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        transformer(**call)
    handle.remove()
    block_list = get_family("qwenimage").block_list("transformer_blocks")
    streams = {"hidden_states", "encoder_hidden_states"}  # cut by the engine itself
    assert set(seen) - streams == set(block_list.per_sample_args) == {"encoder_hidden_states_mask", "temb"}
