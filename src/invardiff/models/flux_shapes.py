"""`flux-shapes`: the pipeline pieces of the bundled text-conditioned Flux model (pixel space, 32x32 RGB).

The "latents" are the pixels themselves (3 channels, an identity VAE with scale factor 1), packed 2x2 into 256
tokens of 12 channels by FluxPipeline; prompts go through the bundled tiny T5 (word-level) and CLIP
(character-level) stacks. The pipeline is a FluxPipeline whose only change is the default number of T5 tokens
(16, what the model was trained with; the stock default of 512 would pad far outside the training distribution).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from .. import toy_components
from ..toy_components import IdentityVAE
from . import shapes


MAX_SEQUENCE_LENGTH = 16
TEXT_WIDTH = 64
TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 12,
    "num_layers": 2,
    "num_single_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": TEXT_WIDTH,
    "pooled_projection_dim": TEXT_WIDTH,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}


class ShapesFluxPipeline(FluxPipeline):
    """FluxPipeline with ``max_sequence_length`` defaulting to the 16 T5 tokens the model was trained with, and the
    image size to the model's 32x32. ``call_defaults`` names these defaults for whatever sizes a call without
    running it (``calibration.batching.pipeline_call_config``: the FLOP profile the budgeted search plans with)."""

    call_defaults = {"height": shapes.SIZE, "width": shapes.SIZE, "max_sequence_length": MAX_SEQUENCE_LENGTH}

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **{**self.call_defaults, **kwargs})


def build_pipeline(transformer: FluxTransformer2DModel | None = None, text_weights: dict | None = None):
    """The pipeline around ``transformer`` (default: random weights of the flux-shapes config)."""
    clip_tokenizer = toy_components.clip_tokenizer()
    t5_tokenizer = toy_components.t5_tokenizer(shapes.VOCABULARY)
    clip, t5 = toy_components.text_encoders(len(clip_tokenizer), len(t5_tokenizer), TEXT_WIDTH)
    if text_weights is not None:
        clip.load_state_dict(text_weights["clip"])
        t5.load_state_dict(text_weights["t5"])
    if transformer is None:
        transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    pipe = ShapesFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=IdentityVAE(latent_channels=3),
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompts, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return prompt_embeds, pooled, text_ids


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B, 256, 12), as FluxPipeline packs its latents."""
    B, C, H, W = images.shape
    return FluxPipeline._pack_latents(images, B, C, H, W)


def image_ids(device="cpu") -> torch.Tensor:
    return FluxPipeline._prepare_latent_image_ids(1, shapes.SIZE // 2, shapes.SIZE // 2, device, torch.float32)
