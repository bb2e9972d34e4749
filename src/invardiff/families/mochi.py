"""Mochi 1 (diffusers ``MochiTransformer3DModel``): one list of 48 asymmetric dual-stream blocks.

A block has a wide visual stream (hidden 3072) and a narrow text stream (hidden 1536) joined in one attention
(``attn1``: image and text in one call, reused only when both ``attn`` and ``context_attn`` are set), then the image
feed-forward ``ff`` and the text feed-forward ``ff_context``. The last block is ``context_pre_only``: it has no
``ff_context`` (the text it would compute is never read), so its spec says so (``ReuseUnit.present``) and plans'
bits for that unit there are ignored. Norms, modulation and gates always run; the step cache holds the image tokens
entering ``norm_out``.

Mochi's attention keeps only the valid text tokens of each sample (``nonzero`` of the padding mask): its FLOPs
depend on the mask. On the meta device (FLOP profile, memory estimate) that read runs under
``invardiff.meta_values``, so the example calls use constant masks: every text token valid (the pipeline's T5 pads
prompts to 256 tokens; a real prompt's padding only lowers the small text part of the cost).

``MochiPipeline`` batches the classifier-free guidance branches in one call (negative rows first) inside
``cache_context("cond_uncond")``, which the spec names the ``"default"`` branch (``PipelineSpec.branch_names``), as
for the other batched pipelines. Its scheduler inverts the sigmas: the transformer gets ``1000 * (1 - sigma)``, 0 at
pure noise (no scaling between the call and the schedule). There is no official InvarDiff or DiCache code for Mochi:
calibration follows the generic official behaviour (DiT/Wan) with ``context_attn`` tied to ``attn``, and DiCache runs
FLUX's rules.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_mochi import MochiRoPE, MochiTransformerBlock

from .model_config import ModelConfig, video_config, video_fields, video_latent_shape
from .sd3 import SD3
from .spec import (
    DUAL_STREAM_KINDS,
    BlockListSpec,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    SizeRule,
    dual_stream_units,
    image_output_index,
)
from .table import register_family


def _embed_timestep(transformer, call):
    # MochiTransformer3DModel.forward's conditioning (B, D), in the latent's dtype: the time embedding plus the
    # attention-pooled text, which every block and the head modulate with (time_embed returns the projected text
    # too, which only the blocks take as their text stream).
    temb, _ = transformer.time_embed(
        call["timestep"],
        call["encoder_hidden_states"],
        call["encoder_attention_mask"],
        hidden_dtype=call["hidden_states"].dtype,
    )
    return temb


def _run_head(transformer, hidden, call):
    # The output section of MochiTransformer3DModel.forward, on the cached image tokens.
    states = call["hidden_states"]  # (B, C, F, H, W)
    batch, _, frames, height, width = states.shape
    p = transformer.config.patch_size
    temb = _embed_timestep(transformer, call)
    hidden = transformer.proj_out(transformer.norm_out(hidden, temb))  # (B, N, p*p*C)
    hidden = hidden.reshape(batch, frames, height // p, width // p, p, p, -1).permute(0, 6, 1, 2, 4, 3, 5)
    output = hidden.reshape(batch, -1, frames, height, width)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _embed_input(transformer, call):
    # The forward's patch embedding: each frame on its own, then the frames' tokens in a row.
    states = call["hidden_states"]
    patches = transformer.patch_embed(states.permute(0, 2, 1, 3, 4).flatten(0, 1))  # (B*F, N_frame, D)
    return patches.unflatten(0, (states.shape[0], -1)).flatten(1, 2)  # (B, N, D)


class _MetaRoPE(MochiRoPE):
    """``MochiRoPE`` for a meta-device build: the same positions and frequencies, without the float32 autocast region
    that ``_create_rope`` opens on its tensors' device type (the meta device has no autocast; the region changes
    nothing here, the einsum's inputs are cast to float32 already)."""

    def _create_rope(self, freqs: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.einsum("nd,dhf->nhf", pos.to(torch.float32), freqs.to(torch.float32))
        return torch.cos(freqs), torch.sin(freqs)


def _on_meta(transformer) -> None:
    transformer.rope.__class__ = _MetaRoPE  # the build is the caller's own meta model, made for counting


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, (1.0 - fraction) * 1000)  # inverted sigmas: 0 at pure noise


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    frames, height, width = video_latent_shape(config)
    return {
        "hidden_states": randn(B, kw["in_channels"], frames, height, width),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["text_embed_dim"]),
        "timestep": torch.full((B,), (1.0 - fraction) * 1000, device=device, dtype=dtype),
        # A constant mask (every text token valid), so that the call also runs on the meta device.
        "encoder_attention_mask": torch.ones(B, config.text_tokens, device=device, dtype=torch.bool),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, text_hidden, text_dim=4096, time_dim=256, in_channels=12):
    """``MochiTransformer3DModel`` arguments (patch 2, SwiGLU feed-forwards): a visual stream of ``heads x
    head_dim`` and a text stream of ``text_hidden`` (the ``pooled_projection_dim``)."""
    return {
        "patch_size": 2,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": num_layers,
        "pooled_projection_dim": text_hidden,
        "in_channels": in_channels,
        "out_channels": None,
        "qk_norm": "rms_norm",
        "text_embed_dim": text_dim,
        "time_embed_dim": time_dim,
        "activation_fn": "swiglu",
        "max_sequence_length": 256,
    }


# 848x480 (MochiPipeline's default size), 163 frames (Mochi 1's 5.4 s at 30 fps): a latent of 28 x 60 x 106 (VAE 6x
# temporal, 8x spatial), 28 x 30 x 53 = 44520 tokens of 2x2 patches; 256 T5 tokens; batched CFG (2 rows per call).
_REAL_LATENT = (28, 60, 106)
_PATCH = (1, 2, 2)  # frames are not patched
NAMED_CONFIGS = (
    # genmo/mochi-1-preview transformer/config.json as diffusers' MochiTransformer3DModel defaults reproduce it: 48
    # blocks, 24 heads of 128 (visual hidden 3072), text hidden 1536, 12 latent channels, T5-XXL 4096, time 256, 10B
    # parameters as published. From the model card and diffusers' defaults; the hub file itself was not read here.
    video_config(
        "mochi-1",
        "mochi",
        transformer_kwargs(48, 24, 128, 1536),
        _REAL_LATENT,
        text_tokens=256,
        batch=2,
        dtype="bfloat16",
        steps=64,  # MochiPipeline's default
        description="Mochi 1 preview (48 asymmetric dual-stream blocks, hidden 3072 / 1536) at 848x480, 163 frames, "
        "batched CFG",
    ),
    video_config(
        "mochi-bench",
        "mochi",
        transformer_kwargs(48, 4, 64, 128, text_dim=256, time_dim=64),
        (4, 16, 16),
        text_tokens=64,
        batch=2,
        steps=64,
        description="Mochi depth (48), hidden 256 / 128, 4 latent frames of 16x16 (256 tokens), 64 text tokens, "
        "batched CFG (CPU benchmark)",
    ),
    video_config(
        "mochi-tiny-fulldepth",
        "mochi",
        transformer_kwargs(48, 2, 16, 16, text_dim=16, time_dim=16, in_channels=4),
        (2, 8, 8),
        text_tokens=8,
        batch=2,
        steps=64,
        description="Mochi depth at hidden 32 / 16 (fast CLI tests)",
    ),
    video_config(
        "mochi-tiny",
        "mochi",
        transformer_kwargs(3, 2, 16, 16, text_dim=16, time_dim=16, in_channels=4),
        (2, 8, 8),
        text_tokens=8,
        batch=2,
        steps=64,
        description="tests: 3 blocks, the last without ff_context",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # genmo/mochi-1-preview's scheduler: flow-match Euler with inverted sigmas (the transformer's timestep is
    # 1000 * (1 - sigma)); the pipeline passes its own linear-quadratic sigmas.
    return FlowMatchEulerDiscreteScheduler(invert_sigmas=True)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import MochiPipeline

    if text_encoders:
        raise NotImplementedError(
            "The Mochi toy pipeline has no text encoder (T5-XXL with its tokenizer); call it with prompt_embeds and "
            "prompt_attention_mask (and their negatives)."
        )
    return MochiPipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    samples = max(1, config.batch // 2)  # batch = samples x CFG halves
    embeds = torch.randn(2, samples, config.text_tokens, kw["text_embed_dim"], generator=generator)
    mask = torch.ones(samples, config.text_tokens, dtype=torch.bool, device=device)  # as the example call's
    frames, height, width = video_latent_shape(config)
    cast = {"device": device, "dtype": config.torch_dtype}
    return {
        "prompt_embeds": embeds[0].to(**cast),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": embeds[1].to(**cast),
        "negative_prompt_attention_mask": mask,
        "height": height * 8,  # MochiPipeline's VAE factors, without a VAE
        "width": width * 8,
        "num_frames": (frames - 1) * 6 + 1,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 4.5,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    height = call_kwargs.get("height") or pipe.default_height
    width = call_kwargs.get("width") or pipe.default_width
    frames = call_kwargs.get("num_frames") or 19  # MochiPipeline's defaults
    spatial, temporal = pipe.vae_spatial_scale_factor, pipe.vae_temporal_scale_factor
    latent = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
    embeds = call_kwargs.get("prompt_embeds")
    text = embeds.shape[1] if embeds is not None else call_kwargs.get("max_sequence_length") or 256
    cfg = call_kwargs.get("guidance_scale", 4.5) > 1
    return {**video_fields(latent, _PATCH), "text_tokens": text, "batch": 2 if cfg else 1}


def _size_rules(pipe) -> dict:
    # prepare_latents divides by the VAE factors (8, 6) without checking; the patch embedding then needs an even
    # latent side: sides are multiples of 16, frames 1 + a multiple of 6.
    side = SizeRule(8 * _PATCH[1], f"the VAE's spatial factor 8 x the patch size {_PATCH[1]}")
    return {"height": side, "width": side, "num_frames": SizeRule(6, "the VAE's temporal factor 6", offset=1)}


MOCHI = register_family(
    FamilySpec(
        name="mochi",
        transformer_class=MochiTransformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=DUAL_STREAM_KINDS,
                units=dual_stream_units(attn="attn1", context_ff_present=lambda block: block.ff_context is not None),
                image_output=image_output_index(MochiTransformerBlock),
                per_sample_args=("temb", "encoder_attention_mask"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=_embed_input,
        embed_timestep=_embed_timestep,
        calibration=SD3.calibration,  # the generic official behaviour, context_attn tied to attn (as for SD3)
        dicache_preset="flux",  # no official DiCache setting for Mochi: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            video=True,
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=_size_rules,
            toy_call_kwargs=_toy_call_kwargs,
            branch_names={"cond_uncond": "default"},
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={**video_fields(_REAL_LATENT, _PATCH), "text_tokens": 256, "batch": 2, "steps": 64},
            named=NAMED_CONFIGS,
            bench={"cpu": "mochi-bench", "full": "mochi-1", "tiny": "mochi-tiny-fulldepth"},
            tiny="mochi-tiny",
            on_meta=_on_meta,
        ),
    )
)
