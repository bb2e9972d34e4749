"""Wan VACE beyond the conformance kit (which runs its toy ``WanVACEPipeline``): what the pipeline hands the
transformer per step (a call per CFG branch, each in its own cache context, with the control latents of the toy
call's video and mask), the call shape with reference images (a latent frame each), and a transformer whose control
channels do not fit the toy VAE."""

from __future__ import annotations

import contextlib
import dataclasses

import PIL.Image
import pytest
import torch

from invardiff.families import get_family
from invardiff.toy_pipelines import build_pipeline, pipeline_call_kwargs

from helpers import output_tensor, tiny_config, tiny_pipeline


T = 3


def _record_calls(transformer) -> list[dict]:
    # Each transformer call: the cache context it runs in, its rows and its control latents.
    calls, context = [], []
    stock = transformer.cache_context

    @contextlib.contextmanager
    def recording_context(name):
        context.append(name)
        try:
            with stock(name):
                yield
        finally:
            context.pop()

    def record(module, args, kwargs):
        names = context[-1] if context else None
        calls.append({"context": names, "rows": kwargs["hidden_states"].shape[0], **kwargs})

    transformer.cache_context = recording_context
    transformer.register_forward_pre_hook(record, with_kwargs=True)
    return calls


def test_each_step_calls_cond_then_uncond_with_the_control_latents_of_the_toy_video_and_mask():
    config, pipe = tiny_pipeline("wanvace")
    calls = _record_calls(pipe.transformer)
    kwargs = pipeline_call_kwargs(config, T)
    latents = output_tensor(pipe(**kwargs)).clone()
    assert [(call["context"], call["rows"]) for call in calls] == [("cond", 1), ("uncond", 1)] * T
    control = calls[0]["control_hidden_states"]
    assert control.shape == (1, 72, 3, 8, 8)  # 2 x 4 latent channels, 64 mask channels; a 3 x 8 x 8 latent
    for call in calls:  # the same control latents at every call, both branches
        assert torch.equal(call["control_hidden_states"], control)
    # The mask folded into channels: each 8x8 pixel block of the toy mask is 0 on the left half (kept), 1 on the right.
    mask = control[0, 8:]
    assert torch.equal(mask[..., :4], torch.zeros_like(mask[..., :4]))
    assert torch.equal(mask[..., 4:], torch.ones_like(mask[..., 4:]))
    # The control video reaches the output through the hints.
    flipped = {**pipeline_call_kwargs(config, T), "video": kwargs["video"].flip(-1)}
    assert not torch.equal(output_tensor(pipe(**flipped)), latents)


IMAGE = PIL.Image.new("RGB", (32, 32), (200, 40, 90))


# None, one image, one video's list of images, a list of such lists (one per video).
@pytest.mark.parametrize(("references", "count"), [(None, 0), (IMAGE, 1), ([IMAGE] * 2, 2), ([[IMAGE] * 2], 2)])
def test_the_call_shape_counts_a_latent_frame_per_reference_image(references, count):
    config, pipe = tiny_pipeline("wanvace")
    calls = _record_calls(pipe.transformer)
    kwargs = {**pipeline_call_kwargs(config, 1), "reference_images": references}
    shape = get_family("wanvace").pipeline.call_shape(pipe, kwargs)
    pipe(**kwargs)
    frames, height, width = calls[0]["hidden_states"].shape[2:]
    assert (frames, height, width) == (3 + count, 8, 8)
    assert shape["extra"]["latent"] == (3 + count, 8, 8)
    assert shape["image_tokens"] == frames * (height // 2) * (width // 2)  # patch 1x2x2


def test_a_transformer_whose_control_channels_do_not_fit_the_toy_vae_is_refused_by_name():
    config = tiny_config("wanvace")
    config = dataclasses.replace(config, transformer_kwargs={**config.transformer_kwargs, "vace_in_channels": 8})
    with pytest.raises(ValueError, match="control latents have 72 channels.*vace_in_channels=8"):
        build_pipeline(config, config.build_transformer())


def test_prompts_reach_the_transformer_through_the_tiny_text_encoder():
    config = tiny_config("wanvace")
    pipe = build_pipeline(config, config.build_transformer(), text_encoders=True)
    calls = _record_calls(pipe.transformer)
    kwargs = {k: v for k, v in pipeline_call_kwargs(config, 1).items() if not k.endswith("prompt_embeds")}
    pipe(**kwargs, prompt="a red ball", negative_prompt="blur", max_sequence_length=8)
    cond, uncond = (call["encoder_hidden_states"] for call in calls)
    assert cond.shape == uncond.shape == (1, 8, 16)  # max_sequence_length tokens of the encoder's width (text_dim)
    assert not torch.equal(cond, uncond)


def test_without_ftfy_a_toy_for_prompts_is_refused_by_name(monkeypatch):
    # WanVACEPipeline's prompt cleaning calls ftfy unchecked: without it the first prompt call would be a NameError.
    monkeypatch.setattr("diffusers.utils.is_ftfy_available", lambda: False)
    config = tiny_config("wanvace")
    with pytest.raises(ImportError, match="needs the ftfy package.*pip install ftfy, or call the pipeline with"):
        build_pipeline(config, config.build_transformer(), text_encoders=True)
    assert build_pipeline(config, config.build_transformer()).vae is not None  # embeddings alone need no ftfy
