"""Allegro's model configs: the 3D rotary embedding of their example calls (the FLOP profile and bench-engine run on
them), and the clear error of a head size diffusers' Allegro rotary embedding cannot split."""

from __future__ import annotations

import dataclasses

import pytest

from invardiff.model_configs import MODEL_CONFIGS


ALLEGRO_CONFIGS = sorted(name for name, config in MODEL_CONFIGS.items() if config.family == "allegro")


@pytest.mark.parametrize("name", ALLEGRO_CONFIGS)
def test_the_rotary_embedding_of_every_allegro_config_covers_each_head(name):
    # allegro-bench had heads of 64: 64 // 3 = 21 channels per axis, odd, and diffusers asserted in the FLOP profile.
    config = MODEL_CONFIGS[name]
    (freqs, positions) = config.example_call("meta")["image_rotary_emb"]
    widths = [cos.shape[-1] for cos, sin in freqs]
    assert sum(widths) == config.transformer_kwargs["attention_head_dim"]  # time, height and width thirds
    assert all(width % 2 == 0 for width in widths)  # each third is rotated by halves
    assert len(positions) == 3


def test_a_head_size_the_rotary_embedding_cannot_split_is_refused_by_name():
    config = MODEL_CONFIGS["allegro-tiny"]
    kwargs = {**config.transformer_kwargs, "num_attention_heads": 2, "attention_head_dim": 16}
    config = dataclasses.replace(config, transformer_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"attention_head_dim to be a multiple of 6 .*; got 16\. Pick"):
        config.example_call("meta")
