"""SkyReels-V2 text-to-video (diffusers ``SkyReelsV2Transformer3DModel`` with ``SkyReelsV2Pipeline``).

SkyReels-V2 is Wan2.1's network, fine-tuned: the same ``blocks`` of self-attention, cross-attention and feed-forward
under the same module names, the same output head and the same pipeline loop (``cache_context("cond" / "uncond")``,
one call per branch, UniPC on flow sigmas). So the family is Wan's spec (``wan.py``: units ``self_attn``,
``cross_attn``, ``ffn``, its head, example calls and calibration behaviour) on SkyReels-V2's classes and configs,
without what is Wan's alone: the official Wan books and presets, Wan2.2's experts, and DiCache's official ``wan2.1``
setting (there is no official InvarDiff or DiCache code for SkyReels-V2, so DiCache runs FLUX's rules).

Diffusion forcing (``SkyReelsV2DiffusionForcingPipeline``: a timestep per latent frame, causal blocks) runs the same
transformer differently and is refused (its head would need the per-frame modulation).
"""

from __future__ import annotations

import dataclasses

from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

from .model_config import ModelConfig, video_call_fields, video_config, video_fields
from .spec import ConfigSpec
from .table import register_family
from .wan import WAN, transformer_kwargs
from .wan import _run_head as _wan_head


def _run_head(transformer, hidden, call):
    if call["enable_diffusion_forcing"]:
        raise NotImplementedError(
            "SkyReels-V2 diffusion forcing (a timestep per latent frame) is not supported; run the text-to-video "
            "SkyReelsV2Pipeline."
        )
    return _wan_head(transformer, hidden, call)  # the same output section as Wan's


# 960x544, 97 frames (SkyReelsV2Pipeline's defaults): a latent of 25 x 68 x 120 (VAE 4x temporal, 8x spatial),
# 25 x 34 x 60 = 51000 tokens; 512 text tokens.
_REAL_LATENT = (25, 68, 120)
NAMED_CONFIGS = (
    # Skywork/SkyReels-V2-T2V-14B-540P-Diffusers: Wan2.1-14B's shape (40 blocks, 40 heads of 128, FFN 13824, T5 4096,
    # patch 1x2x2, no image input, no fps embedding), as diffusers' convert_skyreelsv2_to_diffusers.py writes the
    # SkyReels-V2 14B 540P transformers; the T2V repository's config.json itself was not read here.
    video_config(
        "skyreels-v2-14b-540p",
        "skyreels-v2",
        transformer_kwargs(40, 40, 128, 13824),
        _REAL_LATENT,
        text_tokens=512,
        dtype="bfloat16",
        steps=50,
        description="SkyReels-V2-T2V-14B at 960x544, 97 frames, 512 text tokens (one CFG branch per call)",
    ),
    video_config(
        "skyreels-v2-bench",
        "skyreels-v2",
        transformer_kwargs(40, 4, 64, 1024, text_dim=256),
        (4, 16, 16),
        text_tokens=64,
        steps=50,
        description="SkyReels-V2-14B depth (40), hidden 256, 4 latent frames of 16x16 (256 tokens), 64 text tokens "
        "(CPU benchmark)",
    ),
    video_config(
        "skyreels-v2-tiny",
        "skyreels-v2",
        transformer_kwargs(2, 2, 12, 48, text_dim=16, in_channels=4),
        (3, 8, 8),
        text_tokens=8,
        steps=50,
        description="tests",
    ),
)


def _scheduler() -> UniPCMultistepScheduler:
    # UniPC on flow sigmas with shift 8 (SkyReelsV2Pipeline's example for text-to-video; 5 for image-to-video).
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import SkyReelsV2Pipeline

    if text_encoders:
        raise NotImplementedError(
            "The SkyReels-V2 toy pipeline has no text encoder; call it with prompt_embeds and negative_prompt_embeds."
        )
    return SkyReelsV2Pipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=_scheduler()
    )


def _call_shape(pipe, call_kwargs: dict) -> dict:
    patch = tuple(pipe.transformer.config.patch_size)
    return video_call_fields(pipe, call_kwargs, (544, 960, 97), 512, patch)  # the pipeline's defaults


SKYREELS_V2 = register_family(
    dataclasses.replace(
        WAN,
        name="skyreels-v2",
        transformer_class=SkyReelsV2Transformer3DModel,
        run_head=_run_head,
        presets={},
        dicache_preset="flux",
        official=None,
        pipeline=dataclasses.replace(
            WAN.pipeline,
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent", "guidance_scale": 6.0},  # the pipeline's default guidance
            build_toy=_build_toy,
            call_shape=_call_shape,
            experts=None,
        ),
        configs=ConfigSpec(
            example_call=WAN.configs.example_call,
            call_timestep=WAN.configs.call_timestep,
            json_defaults={**video_fields(_REAL_LATENT), "text_tokens": 512, "steps": 50},
            named=NAMED_CONFIGS,
            bench={"cpu": "skyreels-v2-bench", "full": "skyreels-v2-14b-540p", "tiny": "skyreels-v2-tiny"},
            tiny="skyreels-v2-tiny",
        ),
    )
)
