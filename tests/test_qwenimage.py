"""Qwen-Image family specifics that the conformance kit (run on ``qwenimage-tiny``) does not see: the published config
and the refusal of ``zero_cond_t`` transformers (Qwen-Image-Edit-2511)."""

from __future__ import annotations

import dataclasses

import pytest

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
