"""Chroma specifics the conformance kit does not pin: the published size, ChromaPipeline's CFG calls (two per step,
without ``cache_context``) named by the family, and block outputs described without diffusers' global registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.transformers.transformer_chroma import ChromaTransformerBlock

import invardiff
from invardiff import CachePlan, ModelFacts
from invardiff.engine.adapters import _passthrough_layout
from invardiff.families import get_family
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.toy_pipelines import build_pipeline

from helpers import run_pipeline, tiny_config


T = 4


def test_chroma1_hd_has_the_published_parameter_count():
    # The Chroma1-HD model card gives 8.9B parameters; the config's 19 + 38 blocks at hidden 3072 and its approximator
    # (64 channels, hidden 5120, 5 layers) make exactly this many (meta device: no memory).
    transformer = MODEL_CONFIGS["chroma1-hd"].build_transformer(device="meta")
    assert sum(p.numel() for p in transformer.parameters()) == 8_899_983_424


def _pipe():
    config = tiny_config("chroma")
    return config, build_pipeline(config, config.build_transformer(seed=0))


def test_without_guidance_each_step_is_one_call_of_the_cond_branch():
    config, pipe = _pipe()
    with invardiff.enabled(pipe, invardiff.DiCacheConfig(threshold=0.5, num_inference_steps=T)):
        run_pipeline(pipe, config, T, guidance_scale=1.0)
        branches = invardiff.summary(pipe).branches
    assert list(branches) == ["cond"]
    assert np.asarray(branches["cond"].probe["decision"]).shape == (T, 1)


def get_negative(config):
    return get_family("chroma").pipeline.toy_cfg_kwargs(config, 0, "cpu")


def test_a_new_pipeline_call_names_its_first_call_cond_after_an_aborted_one():
    # An aborted call that stopped after an odd number of transformer calls must not shift the names of the next
    # call's branches: the conditional call of each step stays "cond" (its DiCache records are the fresh run's).
    config, pipe = _pipe()
    cfg = get_negative(config)
    dicache = invardiff.DiCacheConfig(threshold=0.5, num_inference_steps=T)
    with invardiff.enabled(pipe, dicache):
        run_pipeline(pipe, config, T, **cfg)
        fresh = {name: branch.probe["accumulator"].copy() for name, branch in invardiff.summary(pipe).branches.items()}

    calls = []

    def fail_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:  # the conditional call of step 1
            raise RuntimeError("interrupted")

    with invardiff.enabled(pipe, dicache):
        handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(fail_third_call)
        with pytest.raises(RuntimeError, match="interrupted"):
            run_pipeline(pipe, config, T, **cfg)
        handle.remove()
        run_pipeline(pipe, config, T, **cfg)
        again = invardiff.summary(pipe).branches
    assert sorted(again) == ["cond", "uncond"]
    assert not np.allclose(fresh["cond"], fresh["uncond"])  # the branches' records tell them apart
    for name, accumulator in fresh.items():
        np.testing.assert_array_equal(again[name].probe["accumulator"], accumulator)


def test_chroma_block_outputs_are_described_without_writing_into_diffusers_registry():
    with pytest.raises(ValueError, match="not registered"):
        TransformerBlockRegistry.get(ChromaTransformerBlock)  # diffusers' own hooks see no Chroma entry from us
    block = ChromaTransformerBlock(dim=8, num_attention_heads=2, attention_head_dim=4)
    # A skipped dual block passes (encoder_hidden_states, hidden_states) through, in the order it returns them.
    assert _passthrough_layout(block, image_output=1) == [("encoder_hidden_states", 0), ("hidden_states", 1)]


def test_the_toy_pipeline_with_its_t5_encoder_guides_from_a_prompt():
    # pipe(prompt=...) offline: the tiny T5 encoder conditions both branches (an empty negative prompt for uncond);
    # under a reuse-nothing plan the two named branches give the stock output bit for bit.
    config = tiny_config("chroma")
    pipe = build_pipeline(config, config.build_transformer(seed=0), text_encoders=True)
    kwargs = {"prompt": "a red square", "height": 128, "width": 128, "num_inference_steps": T}
    kwargs |= {"guidance_scale": 4.0, "max_sequence_length": 8, "output_type": "latent"}
    stock = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    plan = CachePlan.reuse_nothing(
        ModelFacts.for_family("chroma", get_family("chroma").num_layers(pipe.transformer)), T
    )
    with invardiff.enabled(pipe, plan):
        cached = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        assert sorted(invardiff.summary(pipe).branches) == ["cond", "uncond"]
    assert torch.equal(cached, stock)
