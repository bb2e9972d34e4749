"""LTX-Video (diffusers ``LTXVideoTransformer3DModel``): one list of ``transformer_blocks``, each self-attention,
cross-attention to the text and feed-forward.

Units (laid out like Wan's): ``self_attn`` = ``attn1`` (before its gate), ``cross_attn`` = ``attn2`` (ungated: its
output is added as it is), ``ffn`` = ``ff`` (before its gate). The block's modulation, norms and gates are always
recomputed from the current timestep. The step cache holds the tokens entering ``norm_out`` (the block stack's dtype);
the head is the timestep's shift and scale on ``norm_out``, then ``proj_out`` on the packed tokens.

``LTXPipeline`` packs the latent video into tokens (``(B, F*H*W, C)``, patch 1x1x1) before the transformer and runs
the classifier-free guidance branches as one batched call (negative rows first) inside
``transformer.cache_context("cond_uncond")``: one state, and per-sample probe decisions. Its timestep is the
flow-matching scheduler's, in [0, 1000], one per row. The rotary embedding has one row per sample (the transformer
builds its coordinate grid per row), so it is cut with the samples like the text, its mask and the modulation.

There is no official InvarDiff or DiCache code for LTX-Video: calibration follows the generic official behaviour
(DiT/Wan: corrected step stream, forced module warm-up), and DiCache runs FLUX's rules. Allegro (``allegro.py``),
a PixArt-style model of the same layout, reuses this file's head and prompt helpers.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..toy_components import tiny_t5
from .calibration_spec import FamilyCalibration
from .model_config import ModelConfig, video_config, video_fields, video_latent_shape, video_pipeline_size
from .spec import (
    SELF_CROSS_FF_KINDS,
    BlockListSpec,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    SizeRule,
    self_cross_ff_units,
)
from .table import register_family


# The LTX-Video VAE compresses 8x in time and 32x in space (the pipeline's defaults without a VAE are the same).
COMPRESSION = (8, 32)
FRAME_RATE = 25  # LTXPipeline's default frame_rate: the rotary embedding's temporal scale is 8 / frame_rate


def modulated_head(table, embedded, norm, proj, hidden):
    """The LTX output head on the pre-head tokens ``hidden``: ``proj(norm(hidden) * (1 + scale) + shift)`` with the
    shift and scale of ``table`` (2, D) plus the embedded timestep ``embedded`` (:func:`embedded_timestep`: (B, D),
    or (B, N, D) with one timestep per token), as LTX-Video's and LTX-2's ``forward`` compute it (the same operations
    in the same order: bit-identical)."""
    embedded = embedded.view(embedded.size(0), -1, embedded.size(-1))  # (B, 1 or N, D), as the forward views it
    values = table[None, None] + embedded[:, :, None]
    shift, scale = values[:, :, 0], values[:, :, 1]
    return proj(norm(hidden) * (1 + scale) + shift)


def embedded_timestep(time_embed, timestep, batch: int, dtype: torch.dtype):
    """The embedded timestep that LTX's ``time_embed`` (``AdaLayerNormSingle``) computes in ``dtype`` (the block
    stack's), without its modulation projection: the blocks' modulations are that projection of it and the head's
    shift and scale are added to it. ``(B, D)`` as its embedder returns it, or ``(B, N, D)`` for a timestep with one
    value per token (``(B, N)``: LTX conditioning pipelines)."""
    embedded = time_embed.emb(timestep.flatten(), None, None, batch_size=batch, hidden_dtype=dtype)
    return embedded if timestep.ndim < 2 else embedded.view(batch, -1, embedded.size(-1))


def _embed_timestep(transformer, call):
    states = call["hidden_states"]  # (B, N, C): the patch projection keeps its dtype
    return embedded_timestep(transformer.time_embed, call["timestep"], states.size(0), states.dtype)


def _run_head(transformer, hidden, call):
    # The output section of LTXVideoTransformer3DModel.forward on the cached tokens; the output stays packed.
    batch = call["hidden_states"].size(0)
    embedded = embedded_timestep(transformer.time_embed, call["timestep"], batch, hidden.dtype)
    table, norm, proj = transformer.scale_shift_table, transformer.norm_out, transformer.proj_out
    output = modulated_head(table, embedded, norm, proj, hidden)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    """The flow-matching timestep in [0, 1000] at ``fraction`` of the trajectory, shaped and typed like ``like``."""
    return torch.full_like(like, fraction * 1000)


def text_mask(batch: int, tokens: int, device) -> torch.Tensor:
    """A T5 padding mask (1: a token, 0: padding) in which sample ``b``'s last ``(b % 2 + 1)`` quarters are padding,
    so that prompts of different lengths take part in every example call."""
    kept = tokens - (torch.arange(batch, device=device) % 2 + 1) * (tokens // 4)
    return (torch.arange(tokens, device=device) < kept[:, None]).long()


def rope_interpolation_scale(compression: tuple[int, int] = COMPRESSION, frame_rate: float = FRAME_RATE) -> tuple:
    """The rotary embedding's (time, height, width) scales that ``LTXPipeline`` passes: the VAE's factors, time per
    second of video."""
    temporal, spatial = compression
    return (temporal / frame_rate, spatial, spatial)


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    frames, height, width = video_latent_shape(config)
    return {
        "hidden_states": randn(B, frames * height * width, kw["in_channels"]),  # packed, patch 1x1x1
        "encoder_hidden_states": randn(B, config.text_tokens, kw["caption_channels"]),
        "timestep": torch.full((B,), fraction * 1000, device=device),  # the scheduler's float32 timestep
        "encoder_attention_mask": text_mask(B, config.text_tokens, device),
        "num_frames": frames,
        "height": height,
        "width": width,
        "rope_interpolation_scale": rope_interpolation_scale(),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, caption_channels=4096, in_channels=128):
    """``LTXVideoTransformer3DModel`` arguments. Every LTX-Video 0.9.x transformer/config.json has patch 1x1x1,
    ``gelu-approximate``, ``rms_norm_across_heads``, no norm affine, eps 1e-6, biases, and a cross-attention width
    equal to the hidden size (the caption projection maps the T5 features onto it)."""
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "patch_size": 1,
        "patch_size_t": 1,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "cross_attention_dim": heads * head_dim,
        "num_layers": num_layers,
        "activation_fn": "gelu-approximate",
        "qk_norm": "rms_norm_across_heads",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "caption_channels": caption_channels,
        "attention_bias": True,
        "attention_out_bias": True,
    }


# LTXPipeline's defaults: 704x512, 161 frames -> a latent of 21 x 16 x 22 (7392 tokens), 128 T5 tokens, 50 steps,
# guidance 3 (batched CFG: 2 rows per call).
_REAL_LATENT = (21, 16, 22)
_VIDEO = {"patch": (1, 1, 1), "compression": COMPRESSION}
NAMED_CONFIGS = (
    # Lightricks/LTX-Video transformer/config.json (0.9.0-0.9.5, the 2B model): 28 layers, 32 heads of 64 (hidden
    # 2048), cross_attention_dim 2048, caption_channels 4096 (T5-XXL), in/out 128 channels. These are also the
    # defaults of diffusers' LTXVideoTransformer3DModel, which were written from that config.
    video_config(
        "ltx-video-2b",
        "ltx",
        transformer_kwargs(28, 32, 64),
        _REAL_LATENT,
        **_VIDEO,
        text_tokens=128,
        batch=2,
        dtype="bfloat16",
        steps=50,
        description="LTX-Video 2B (0.9.x, 28 blocks, hidden 2048) at 704x512, 161 frames, 128 text tokens, batched "
        "CFG",
    ),
    # LTX-Video 0.9.7 / 0.9.8 13B (Lightricks/LTX-Video-0.9.7-dev in diffusers form): 48 layers, 32 heads of 128
    # (hidden 4096), cross_attention_dim 4096, caption_channels 4096. From memory of the published config, not
    # checked against the file here; consistent with the stated 13B parameters (48 x 16 x 4096^2 = 12.9B).
    video_config(
        "ltx-video-13b",
        "ltx",
        transformer_kwargs(48, 32, 128),
        _REAL_LATENT,
        **_VIDEO,
        text_tokens=128,
        batch=2,
        dtype="bfloat16",
        steps=50,
        description="LTX-Video 13B (0.9.7/0.9.8, 48 blocks, hidden 4096) at 704x512, 161 frames, 128 text tokens, "
        "batched CFG (config unverified)",
    ),
    video_config(
        "ltx-bench",
        "ltx",
        transformer_kwargs(28, 4, 64, caption_channels=256),
        (4, 8, 8),
        **_VIDEO,
        text_tokens=64,
        batch=2,
        steps=50,
        description="LTX-Video 2B depth (28), hidden 256, 4 latent frames of 8x8 (256 tokens), 64 text tokens, "
        "batched CFG (CPU benchmark)",
    ),
    video_config(
        "ltx-tiny-fulldepth",
        "ltx",
        transformer_kwargs(28, 2, 8, caption_channels=16, in_channels=8),
        (3, 2, 2),
        **_VIDEO,
        text_tokens=8,
        batch=2,
        steps=50,
        description="LTX-Video 2B depth at hidden 16 (fast CLI tests)",
    ),
    video_config(
        "ltx-tiny",
        "ltx",
        transformer_kwargs(2, 2, 8, caption_channels=16, in_channels=8),
        (3, 2, 2),
        **_VIDEO,
        text_tokens=8,
        batch=2,
        steps=50,
        description="tests",
    ),
)


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """LTX's sampler: flow-matching Euler with the resolution-dependent shift the pipeline computes (``mu``).

    The values of Lightricks/LTX-Video's scheduler/scheduler_config.json, from memory (base_shift 0.95 and max_shift
    2.05 match LTX's own scheduler defaults; the sequence lengths and the terminal shift were not checked here)."""
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        base_shift=0.95,
        max_shift=2.05,
        shift_terminal=0.1,
    )


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    # No VAE: the pipeline returns packed latents; without text encoders it runs from prompt_embeds and their masks.
    from diffusers import LTXPipeline

    encoders = (
        tiny_t5(config.transformer_kwargs["caption_channels"])
        if text_encoders
        else {"text_encoder": None, "tokenizer": None}
    )
    return LTXPipeline(scheduler=scheduler(), vae=None, transformer=transformer, **encoders)


def toy_prompts(config: ModelConfig, generator: torch.Generator, width: int, device) -> dict:
    """Prompt and negative prompt embeddings (``samples`` = half the config's batch: CFG doubles it) with T5 padding
    masks of different lengths, as ``prompt_embeds`` and friends of an LTX pipeline call."""
    samples = max(1, config.batch // 2)
    embeds = torch.randn(2, samples, config.text_tokens, width, generator=generator)
    lengths = torch.randint(config.text_tokens // 2, config.text_tokens + 1, (2, samples), generator=generator)
    masks = (torch.arange(config.text_tokens) < lengths[..., None]).long()
    cast = {"device": device, "dtype": config.torch_dtype}
    return {
        "prompt_embeds": embeds[0].to(**cast),
        "prompt_attention_mask": masks[0].to(device),
        "negative_prompt_embeds": embeds[1].to(**cast),
        "negative_prompt_attention_mask": masks[1].to(device),
    }


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return {
        **toy_prompts(config, generator, config.transformer_kwargs["caption_channels"], device),
        **video_pipeline_size(config),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 3.0,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def call_size(call_kwargs: dict, default_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """The ``(height, width, num_frames)`` of a video pipeline call: its own, else the pipeline's defaults."""
    keys = ("height", "width", "num_frames")
    return tuple(call_kwargs.get(key) or default for key, default in zip(keys, default_size, strict=True))


def call_shape(pipe, call_kwargs: dict, default_size=(512, 704, 161), text_tokens: int = 128) -> dict:
    """:class:`ModelConfig` call-shape fields of one sample of an LTX pipeline call: its latent, its T5 tokens, and
    two rows per call under guidance (``default_size``: the pipeline's (height, width, num_frames) defaults)."""
    height, width, frames = call_size(call_kwargs, default_size)
    temporal, spatial = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
    latent = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
    side = pipe.transformer_spatial_patch_size
    patch = (pipe.transformer_temporal_patch_size, side, side)
    cfg = call_kwargs.get("guidance_scale", 3.0) > 1
    tokens = call_kwargs.get("max_sequence_length") or text_tokens
    return {**video_fields(latent, patch, (temporal, spatial)), "text_tokens": tokens, "batch": 2 if cfg else 1}


def size_rules(pipe) -> dict:
    """The pipeline's size rules: height and width multiples of 32 (its own check) times the VAE's and the patch's
    factors; ``num_frames`` one more than a multiple of the VAE's temporal factor (else the latent length rounds)."""
    spatial = pipe.vae_spatial_compression_ratio * pipe.transformer_spatial_patch_size
    side = math.lcm(32, spatial)
    why = f"the pipeline's multiple of 32 and the VAE's spatial factor x the patch size ({spatial})"
    temporal = pipe.vae_temporal_compression_ratio * pipe.transformer_temporal_patch_size
    frames = SizeRule(temporal, f"the VAE's temporal factor x the temporal patch size ({temporal})", offset=1)
    return {"height": SizeRule(side, why), "width": SizeRule(side, why), "num_frames": frames}


LTX = register_family(
    FamilySpec(
        name="ltx",
        transformer_class=LTXVideoTransformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=SELF_CROSS_FF_KINDS,
                units=self_cross_ff_units(),
                per_sample_args=("encoder_hidden_states", "temb", "image_rotary_emb", "encoder_attention_mask"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.proj_in(call["hidden_states"]),  # (B, N, D)
        embed_timestep=_embed_timestep,
        # No official code: the generic official behaviour (DiT/Wan), every branch of the batched call recorded.
        calibration=FamilyCalibration(correct_step=True, provisional_module_warmup=True),
        dicache_preset="flux",  # no official DiCache setting for LTX-Video: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            video=True,
            scheduler=scheduler,
            calibration_kwargs={"output_type": "latent"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=call_shape,
            size_rules=size_rules,
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=call_timestep,
            # A config.json says nothing of the call: the pipeline's 704x512, 161 frames, 128 T5 tokens, batched CFG.
            json_defaults={**video_fields(_REAL_LATENT, **_VIDEO), "text_tokens": 128, "batch": 2, "steps": 50},
            named=NAMED_CONFIGS,
            bench={"cpu": "ltx-bench", "full": "ltx-video-2b", "tiny": "ltx-tiny-fulldepth"},
            tiny="ltx-tiny",
        ),
    )
)
