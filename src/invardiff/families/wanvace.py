"""Wan2.1 VACE (diffusers ``WanVACETransformer3DModel``): Wan2.1's ``blocks`` plus the VACE control blocks
(``vace_blocks``), which turn the control latents (``control_hidden_states``: masked video and mask) into hints that
the transformer's ``forward`` adds to the main stream after the main blocks listed in ``config.vace_layers``.

The main blocks are Wan2.1's blocks with Wan's units, head, input and timestep embedding (imported from
:mod:`.wan`). The VACE blocks are not a block list of the engine: they run on every computed call, as the stock
model runs them, and none of their units is reused. Why:

* DiCache skips the deep blocks by passing each block's input through, and a VACE block returns a hint that is none of
  its inputs: a skipped VACE block has nothing to hand on. Listed first (they run before the main blocks, and block
  lists are in execution order), they would also make DiCache's probe the control stream, not the main stream the
  official Wan DiCache probes.
* Their hints are computed from the current call's tokens and timestep whenever the transformer runs, so they stay
  consistent with the step cache: a step-cached step replaces the whole ``forward`` by the head on the cached
  pre-head state, which already holds the hints of the step it was computed at, and a reused main-block unit is
  Wan's reuse (the hint after that block is the current one).

The cost: a computed step always pays the VACE blocks (15 of 45 blocks in the 1.3B model, 8 of 48 in the 14B), and a
plan's ideal speedup counts them as always computed. The hints are added to the whole batch between the blocks, so
when a probe (DiCache, plan+probe) lets some samples of a call skip, each deep block cuts the computing samples out of
its own inputs and writes its output back into the whole batch (``FamilySpec.rows_in_place``, as HiDream's), so the
hints still meet a whole batch. ``WanVACEPipeline`` calls each classifier-free guidance
branch separately (``cache_context("cond" / "uncond")``), one row per prompt.

DiCache preset: Wan's (``wan2.1``, from DiCache's official Wan code), since the main stream is Wan2.1's. The
calibration defaults and presets are Wan's.

Toy pipeline. The stock ``WanVACEPipeline`` runs offline around a random-weight transformer with Wan's toy sampler
and text stack (:func:`.wan.toy_parts`) and a tiny random ``AutoencoderKLWan`` at Wan2.1's compression (4x in time,
8x in space), which encodes the control video before the first step. The toy call (the conformance kit's) gives a
random control video and a mask that regenerates the right half of every frame, so the control latents (inactive
and reactive video, folded mask) and the hints carry signal.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import WanVACETransformer3DModel

from ..seeding import seeded
from .model_config import DEFAULT_VIDEO_COMPRESSION, ModelConfig, video_config, video_fields, video_latent_shape
from .spec import ConfigSpec
from .table import register_family
from .wan import WAN, toy_parts
from .wan import transformer_kwargs as wan_transformer_kwargs


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    frames, height, width = video_latent_shape(config)
    return {
        "hidden_states": randn(B, kw["in_channels"], frames, height, width),
        "timestep": torch.full((B,), fraction * 1000, device=device, dtype=config.torch_dtype),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["text_dim"]),
        # The VAE latents of the masked control video and the mask, vace_in_channels of them.
        "control_hidden_states": randn(B, kw["vace_in_channels"], frames, height, width),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, ffn_dim, vace_layers, text_dim=4096, in_channels=16, vace=96):
    """``WanVACETransformer3DModel`` arguments: Wan2.1's, plus the main blocks that receive a hint and the control
    latent channels (96 in the published models: 16 latent channels of the inactive and of the reactive video, and
    the 8x8 pixel mask folded into 64 channels)."""
    kwargs = wan_transformer_kwargs(num_layers, heads, head_dim, ffn_dim, text_dim=text_dim, in_channels=in_channels)
    return {**kwargs, "vace_layers": tuple(vace_layers), "vace_in_channels": vace}


# 832x480, 81 frames (the VACE defaults): a latent of 21 x 60 x 104.
_REAL_LATENT = (21, 60, 104)
# The published transformer configs (Wan-AI/Wan2.1-VACE-1.3B-diffusers and -14B-diffusers, transformer/config.json,
# from memory and not verified offline): Wan2.1-T2V's 1.3B (30 layers, 12 heads of 128, ffn 8960) and 14B
# (40 layers, 40 heads, ffn 13824) with VACE hints after every second block of the 1.3B and every fifth of the 14B,
# and 96 control channels.
NAMED_CONFIGS = (
    video_config(
        "wan2.1-vace-1.3b",
        "wanvace",
        transformer_kwargs(30, 12, 128, 8960, range(0, 30, 2)),
        _REAL_LATENT,
        text_tokens=512,
        dtype="bfloat16",
        steps=50,
        description="Wan2.1-VACE-1.3B at 832x480, 81 frames, 512 text tokens (one CFG branch per call)",
    ),
    video_config(
        "wan2.1-vace-14b",
        "wanvace",
        transformer_kwargs(40, 40, 128, 13824, range(0, 40, 5)),
        _REAL_LATENT,
        text_tokens=512,
        dtype="bfloat16",
        steps=50,
        description="Wan2.1-VACE-14B at 832x480, 81 frames, 512 text tokens (one CFG branch per call)",
    ),
    video_config(
        "wanvace-bench",
        "wanvace",
        transformer_kwargs(30, 4, 64, 1024, range(0, 30, 2), text_dim=256),
        (4, 16, 16),
        text_tokens=64,
        steps=50,
        description="Wan2.1-VACE-1.3B depth (30 + 15 VACE blocks), hidden 256, 4 latent frames of 16x16 (256 tokens), "
        "64 text tokens (CPU benchmark)",
    ),
    video_config(
        "wanvace-tiny",
        "wanvace",
        # 72 control channels: 2 x 4 latent channels and the 8x8 mask of the toy pipeline's VAE.
        transformer_kwargs(2, 2, 12, 48, (0, 1), text_dim=16, in_channels=4, vace=72),
        (3, 8, 8),
        text_tokens=8,
        steps=50,
        description="tests",
    ),
)


# ----- the stock WanVACEPipeline around a random-weight transformer (no downloads) ------------------------------
def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    # The VAE: latent width the transformer's in_channels, three downsampling stages of which the last two are also
    # temporal (the pipeline reads its 8x / 4x factors off `temperal_downsample`), one residual block per stage and
    # 4 channels throughout; the identity latent normalisation. It stays float32 whatever the transformer's dtype,
    # as diffusers' Wan examples load it.
    from diffusers import AutoencoderKLWan, WanVACEPipeline
    from diffusers.utils import is_ftfy_available

    if text_encoders and not is_ftfy_available():
        # WanVACEPipeline cleans prompts with ftfy.fix_text without checking for it (diffusers 0.42; WanPipeline
        # checks): a prompt call would fail with a NameError at its first prompt.
        raise ImportError(
            "WanVACEPipeline's prompt encoding needs the ftfy package, which is not installed: pip install ftfy, "
            "or call the pipeline with prompt_embeds.",
            name="ftfy",
        )
    latent = transformer.config.in_channels
    expected = _control_channels(latent)
    if transformer.config.vace_in_channels != expected:
        raise ValueError(
            f"The toy WanVACEPipeline's control latents have {expected} channels (2 x {latent} latent channels and "
            f"the 8x8 mask), but the transformer takes vace_in_channels={transformer.config.vace_in_channels}: "
            f"give the config vace_in_channels={expected}."
        )
    with seeded(0):
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=latent,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * latent,
            latents_std=[1.0] * latent,
        )
    vae = vae.eval().requires_grad_(False)
    return WanVACEPipeline(vae=vae, transformer=transformer, **toy_parts(config, text_encoders))


def _control_channels(latent_channels: int) -> int:
    """The control latent channels ``WanVACEPipeline`` gives the transformer (its ``vace_in_channels``) for a VAE of
    ``latent_channels`` at Wan's 8x spatial compression: the inactive and the reactive video's latents, and the
    8 x 8 pixel mask of each latent pixel folded into channels."""
    spatial = DEFAULT_VIDEO_COMPRESSION[1]
    return 2 * latent_channels + spatial * spatial


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    # Wan's toy call (embeddings, CFG at 5, latents out) plus the control: a random clip in [0, 1] whose left half
    # is kept and right half regenerated (mask 1), drawn from the call's generator after Wan's embeddings.
    kwargs = WAN.pipeline.toy_call_kwargs(config, num_inference_steps, seed, device)
    shape = (config.batch, kwargs["num_frames"], 3, kwargs["height"], kwargs["width"])  # (B, F, C, H, W)
    video = torch.rand(shape, generator=kwargs["generator"])
    mask = torch.zeros(shape)
    mask[..., kwargs["width"] // 2 :] = 1.0
    return {**kwargs, "video": video.to(device), "mask": mask.to(device)}


def _reference_frames(reference_images) -> int:
    # WanVACEPipeline puts each reference image of a video in a latent frame of its own before the video's: one
    # image, a list of images (one video's), or a list of such lists (one per video, all as long).
    if reference_images is None:
        return 0
    if not isinstance(reference_images, (list, tuple)):
        return 1
    first = reference_images[0] if len(reference_images) else None
    return len(first) if isinstance(first, (list, tuple)) else len(reference_images)


def _call_shape(pipe, call_kwargs: dict) -> dict:
    # Wan's rules (defaults 480x832, 81 frames, 512 text tokens), plus a latent frame per reference image.
    fields = WAN.pipeline.call_shape(pipe, call_kwargs)
    references = _reference_frames(call_kwargs.get("reference_images"))
    if not references:
        return fields
    frames, height, width = fields["extra"]["latent"]
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    return {**fields, **video_fields((frames + references, height, width), tuple(transformer.config.patch_size))}


WAN_VACE = register_family(
    dataclasses.replace(
        WAN,
        name="wanvace",
        transformer_class=WanVACETransformer3DModel,
        # The main stream's head, input and timestep are Wan's (WanVACETransformer3DModel.forward's output section is
        # WanTransformer3DModel's for a (B,) timestep); the block list is Wan's `blocks` (see the module docstring).
        # WanVACEPipeline: Wan's sampler, sizes, CFG (a call per branch) and experts (transformer_2).
        pipeline=dataclasses.replace(
            WAN.pipeline, build_toy=_build_toy, toy_call_kwargs=_toy_call_kwargs, call_shape=_call_shape
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=WAN.configs.call_timestep,
            json_defaults={**video_fields(_REAL_LATENT), "text_tokens": 512, "steps": 50},
            named=NAMED_CONFIGS,
            bench={"cpu": "wanvace-bench", "full": "wan2.1-vace-1.3b", "tiny": "wanvace-tiny"},
            tiny="wanvace-tiny",
        ),
        official=None,
        rows_in_place=True,  # the hints are added to the whole batch between the blocks
    )
)
