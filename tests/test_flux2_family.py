"""FLUX.2 facts the conformance kit does not check: the published size and the pipeline's one call per step."""

import torch
from diffusers import Flux2Transformer2DModel

from invardiff.families import get_family
from invardiff.model_configs import get_model_config
from invardiff.toy_pipelines import build_pipeline, pipeline_call_kwargs


def test_flux2_dev_has_the_published_size():
    # FLUX.2-dev is published as a 32B-parameter transformer: 8 dual + 48 single blocks at hidden 6144.
    config = get_model_config("flux2-dev")
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**config.transformer_kwargs)
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (8, 48)
    assert transformer.inner_dim == 6144
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 1) == 32.2


def test_flux2_units_are_the_gated_modules_of_each_block():
    config = get_model_config("flux2-tiny")
    transformer = config.build_transformer(seed=0)
    units = [(spec.attr, layer, unit.module) for spec, layer, unit, _ in get_family("flux2").units_of(transformer)]
    dual = [("transformer_blocks", layer, module) for layer in range(2) for module in ("attn", "ff", "ff_context")]
    single = [("single_transformer_blocks", layer, "attn") for layer in range(3)]
    assert units == dual + single


def test_the_guidance_distilled_pipeline_calls_the_transformer_once_per_step_with_guidance_as_input():
    # What PipelineSpec(guided=False) says: no CFG branches, the guidance scale is an input of each call.
    config = get_model_config("flux2-tiny")
    pipe = build_pipeline(config, config.build_transformer(seed=0))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    pipe(**pipeline_call_kwargs(config, num_inference_steps=3, seed=0))
    assert len(calls) == 3
    for call in calls:
        assert call["hidden_states"].shape == (1, config.image_tokens, 16)
        assert call["guidance"].tolist() == [4.0]
    assert not get_family("flux2").pipeline.guided
