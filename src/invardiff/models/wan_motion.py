"""`wan-motion`: the pipeline pieces of the bundled text-conditioned Wan video model (pixel space, 8 frames of
32x32 RGB).

The "latents" are the pixels themselves (3 channels, 8 frames): an identity VAE with spatial and temporal scale
factors 1 and latents_mean 0 / latents_std 1, so WanPipeline's de-normalisation and decode leave them as they
are. The transformer patches 2 frames x 4 x 4 pixels into one token (4 x 8 x 8 = 256 tokens). Prompts go
through the bundled word-level T5 tokenizer and a tiny frozen UMT5 encoder (Wan's text encoder family). The
pipeline is a WanPipeline whose only changes are its defaults: the clip size, 8 frames, and 8 text tokens (what
the model was trained with; the stock 512 would pad far outside the training distribution). Sampling is the
Wan family's flow-matching UniPC with shift 5 and classifier-free guidance as separate cond/uncond calls.
"""

from __future__ import annotations

import logging

import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config

from .. import toy_components
from ..families import get_family
from ..toy_components import IdentityVAE
from . import motion


MAX_SEQUENCE_LENGTH = 8
TEXT_WIDTH = 64
TRANSFORMER_CONFIG = {
    "patch_size": (2, 4, 4),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": TEXT_WIDTH,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 5,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}


class IdentityVideoVAE(IdentityVAE):
    """The identity VAE with the config fields WanPipeline reads: no spatial or temporal compression and latents
    normalised by mean 0, std 1 (so the pipeline's de-normalisation is the identity too)."""

    @register_to_config
    def __init__(self, latent_channels: int = 3):
        super().__init__(latent_channels=latent_channels)
        self.register_to_config(
            z_dim=latent_channels,
            scale_factor_spatial=1,
            scale_factor_temporal=1,
            latents_mean=[0.0] * latent_channels,
            latents_std=[1.0] * latent_channels,
        )


# WanPipeline assumes the Wan VAE's 4x temporal compression (1 + 4k frames) and warns about, then rounds, any
# other count: with a temporal factor of 1 it asks for one frame more than the clip has. WanMotionPipeline asks
# for FRAMES - 1, which the rounding brings back to FRAMES, and drops that one warning (and only it).
def _frame_rounding(record: logging.LogRecord) -> bool:
    return "`num_frames - 1` has to be divisible by" not in record.getMessage()


class WanMotionPipeline(WanPipeline):  # the "Wan" prefix: cache-dit picks its adapter by class name
    """WanPipeline with the clip size, frame count (8) and text length (8 tokens) `wan-motion` was trained with.
    ``num_frames`` other than 8 is refused: the model has only seen 8-frame clips."""

    def __call__(
        self, *args, num_frames: int = motion.FRAMES, max_sequence_length: int = MAX_SEQUENCE_LENGTH, **kwargs
    ):
        if num_frames != motion.FRAMES:
            raise ValueError(
                f"wan-motion generates clips of {motion.FRAMES} frames (what it was trained on), got "
                f"num_frames={num_frames}; leave num_frames out."
            )
        kwargs.setdefault("height", motion.SIZE)
        kwargs.setdefault("width", motion.SIZE)
        logger = logging.getLogger(WanPipeline.__module__)
        logger.addFilter(_frame_rounding)
        try:
            return super().__call__(
                *args, num_frames=num_frames - 1, max_sequence_length=max_sequence_length, **kwargs
            )
        finally:
            logger.removeFilter(_frame_rounding)


def build_pipeline(transformer: WanTransformer3DModel | None = None, text_weights: dict | None = None):
    """The pipeline around ``transformer`` (default: random weights of the wan-motion config) and the bundled text
    encoder (random seeded weights unless ``text_weights``, a UMT5 encoder state dict, is given)."""
    tokenizer = toy_components.t5_tokenizer(motion.VOCABULARY)
    encoder = toy_components.umt5_encoder(len(tokenizer), TEXT_WIDTH)
    if text_weights is not None:
        encoder.load_state_dict(text_weights)
    if transformer is None:
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    pipe = WanMotionPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=IdentityVideoVAE(latent_channels=3),
        scheduler=get_family("wan").pipeline.scheduler(),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (N, MAX_SEQUENCE_LENGTH, TEXT_WIDTH) of ``prompts`` as the pipeline computes them."""
    embeds, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu"
    )
    return embeds
