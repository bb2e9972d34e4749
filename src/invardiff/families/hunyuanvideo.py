"""HunyuanVideo (diffusers ``HunyuanVideoTransformer3DModel``): 20 dual-stream blocks, then 40 single-stream blocks.

Laid out like FLUX: dual blocks reuse the joint attention (image and text in one call, reused only when both
``attn`` and ``context_attn`` are set), ``ff`` (image) and ``context_ff`` (text, ``ff_context``); single blocks reuse
``attn`` and ``mlp`` = ``act_mlp(proj_mlp(x))`` while their norm, gate and ``proj_out`` are always paid. The token
refiner, the time / guidance / pooled-text embedding and the rotary embedding always run. The step cache holds the
image tokens entering ``norm_out``.

The attention mask (which text tokens are padding, one row per sample) is a per-sample block argument, cut with the
samples when a probe lets only some of them run the deep blocks. ``HunyuanVideoPipeline`` runs true CFG (when
asked) as separate ``cache_context("cond" / "uncond")`` calls: one state per branch under one plan.

There is no official InvarDiff code for HunyuanVideo (SPEC.md A.5): no presets or books; calibration follows the
generic official behaviour (DiT/Wan) with ``context_attn`` tied to ``attn``. DiCache's ``hunyuanvideo`` preset is the
official setting (SPEC.md B.5). Image-to-video models (``image_condition_type="token_replace"``) use other block
classes and are not supported.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
)

from .calibration_spec import FamilyCalibration
from .model_config import (
    ModelConfig,
    video_call_fields,
    video_config,
    video_fields,
    video_latent_shape,
    video_pipeline_size,
    video_size_rules,
)
from .spec import (
    DUAL_STREAM_KINDS,
    BlockListSpec,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    ReuseUnit,
    dual_stream_units,
    image_output_index,
)
from .table import register_family


def _embed_timestep(transformer, call):
    # HunyuanVideoTransformer3DModel.forward's conditioning (timestep, pooled text, guidance): the temb every block
    # and the head take, (B, D).
    return transformer.time_text_embed(call["timestep"], call["pooled_projections"], call["guidance"])[0]


def _run_head(transformer, hidden, call):
    # The output section of HunyuanVideoTransformer3DModel.forward, on the cached image tokens.
    if transformer.config.image_condition_type == "token_replace":
        raise NotImplementedError("HunyuanVideo image-to-video (token_replace) models are not supported.")
    temb = _embed_timestep(transformer, call)
    return video_output(transformer, transformer.proj_out(transformer.norm_out(hidden, temb)), call)


def video_output(transformer, hidden, call):
    """The end of the HunyuanVideo (1.0 and 1.5) ``forward``: the ``proj_out`` tokens (B, N, p_t*p*p*C) put back into
    a (B, C, F, H, W) clip of the call's latent shape, returned as ``forward`` returns it."""
    batch, _, frames, height, width = call["hidden_states"].shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    hidden = hidden.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
    output = hidden.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction * 1000)  # the flow-matching timestep in [0, 1000]


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    frames, height, width = video_latent_shape(config)
    # Prompts of different lengths: sample b's last (b % 2 + 1) quarters of text tokens are padding.
    kept = config.text_tokens - (torch.arange(B, device=device) % 2 + 1) * (config.text_tokens // 4)
    mask = (torch.arange(config.text_tokens, device=device) < kept[:, None]).to(dtype)  # (B, L)
    return {
        "hidden_states": randn(B, kw["in_channels"], frames, height, width),
        "timestep": torch.full((B,), fraction * 1000, device=device, dtype=dtype),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["text_embed_dim"]),
        "encoder_attention_mask": mask,
        "pooled_projections": randn(B, kw["pooled_projection_dim"]),
        "guidance": torch.full((B,), 6000.0, device=device, dtype=dtype),  # embedded CFG 6.0, times 1000
        "return_dict": False,
    }


def transformer_kwargs(num_layers, num_single_layers, heads, head_dim, axes, text_dim, pooled_dim, in_channels=16):
    """``HunyuanVideoTransformer3DModel`` arguments of a HunyuanVideo-T/2-like text-to-video transformer."""
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "num_refiner_layers": 2,
        "mlp_ratio": 4.0,
        "patch_size": 2,
        "patch_size_t": 1,
        "qk_norm": "rms_norm",
        "guidance_embeds": True,
        "text_embed_dim": text_dim,
        "pooled_projection_dim": pooled_dim,
        "rope_theta": 256.0,
        "rope_axes_dim": axes,
    }


# 960x544, 129 frames (the official DiCache setting, SPEC.md B.5): a latent of 33 x 68 x 120, 67320 tokens.
_REAL_LATENT = (33, 68, 120)
NAMED_CONFIGS = (
    video_config(
        "hunyuanvideo",
        "hunyuanvideo",
        transformer_kwargs(20, 40, 24, 128, (16, 56, 56), 4096, 768),
        _REAL_LATENT,
        text_tokens=256,
        dtype="bfloat16",
        steps=50,
        description="HunyuanVideo (20 dual + 40 single blocks) at 960x544, 129 frames, 256 text tokens",
    ),
    video_config(
        "hunyuanvideo-bench",
        "hunyuanvideo",
        transformer_kwargs(20, 40, 4, 64, (16, 24, 24), 256, 256),
        (4, 16, 16),
        text_tokens=64,
        steps=50,
        description="HunyuanVideo depth (20+40), hidden 256, 4 latent frames of 16x16 (256 tokens), 64 text tokens "
        "(CPU benchmark)",
    ),
    video_config(
        "hunyuanvideo-tiny-fulldepth",
        "hunyuanvideo",
        transformer_kwargs(20, 40, 2, 16, (4, 6, 6), 16, 16, in_channels=4),
        (3, 8, 8),
        text_tokens=8,
        steps=50,
        description="HunyuanVideo depth at hidden 32 (fast CLI tests)",
    ),
    video_config(
        "hunyuanvideo-tiny",
        "hunyuanvideo",
        transformer_kwargs(2, 4, 2, 16, (4, 6, 6), 16, 16, in_channels=4),
        (3, 8, 8),
        text_tokens=8,
        steps=50,
        description="tests",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=7.0)  # the official sampler's shift (SPEC.md B.5)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import HunyuanVideoPipeline

    if text_encoders:
        raise NotImplementedError(
            "The HunyuanVideo toy pipeline has no text encoders (its Llama prompt template needs a real tokenizer); "
            "call it with prompt_embeds, pooled_prompt_embeds and prompt_attention_mask."
        )
    return HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=None,
        scheduler=_scheduler(),
        text_encoder_2=None,
        tokenizer_2=None,
    )


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    frames, height, width = video_latent_shape(config)
    B, L = config.batch, config.text_tokens
    embeds = torch.randn(2, B, L, kw["text_embed_dim"], generator=generator)
    pooled = torch.randn(2, B, kw["pooled_projection_dim"], generator=generator)
    # Each prompt has its own length: the masks differ per sample and per branch.
    lengths = torch.randint(L // 2, L + 1, (2, B), generator=generator)
    mask = (torch.arange(L) < lengths[..., None]).to(config.torch_dtype)  # (2, B, L)
    cast = {"device": device, "dtype": config.torch_dtype}
    return {
        "prompt_embeds": embeds[0].to(**cast),
        "pooled_prompt_embeds": pooled[0].to(**cast),
        "prompt_attention_mask": mask[0].to(device),
        "negative_prompt_embeds": embeds[1].to(**cast),
        "negative_pooled_prompt_embeds": pooled[1].to(**cast),
        "negative_prompt_attention_mask": mask[1].to(device),
        "true_cfg_scale": 6.0,  # true CFG: a cond and an uncond call per step
        "guidance_scale": 6.0,  # embedded guidance (HunyuanVideo-T/2-cfgdistill)
        **video_pipeline_size(config),
        "num_inference_steps": num_inference_steps,
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def patch_of(pipe) -> tuple[int, int, int]:
    """The transformer's (frames, height, width) patch, as HunyuanVideo and HunyuanVideo-1.5 configs state it."""
    config = pipe.transformer.config
    return config.patch_size_t, config.patch_size, config.patch_size


def _call_shape(pipe, call_kwargs: dict) -> dict:
    return video_call_fields(pipe, call_kwargs, (720, 1280, 129), 256, patch_of(pipe))


def size_rules(pipe) -> dict:
    """The pipeline's size rules (also HunyuanVideo-1.5's: the same patch fields and VAE layout)."""
    return video_size_rules(pipe, patch_of(pipe))


HUNYUANVIDEO = register_family(
    FamilySpec(
        name="hunyuanvideo",
        transformer_class=HunyuanVideoTransformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=DUAL_STREAM_KINDS,
                units=dual_stream_units(),
                image_output=image_output_index(HunyuanVideoTransformerBlock),
                per_sample_args=("temb", "attention_mask"),
            ),
            BlockListSpec(
                attr="single_transformer_blocks",
                module_kinds=("attn", "mlp"),
                units=(
                    ReuseUnit("attn", ("attn",), "attn", kind_outputs=(0,)),
                    ReuseUnit("mlp", ("mlp",), "proj_mlp", passthrough="act_mlp"),
                ),
                image_output=image_output_index(HunyuanVideoSingleTransformerBlock),
                per_sample_args=("temb", "attention_mask"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.x_embedder(call["hidden_states"]),  # (B, N_img, D)
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(
            correct_step=True,
            provisional_module_warmup=True,
            tied_kinds={"transformer_blocks.context_attn": "transformer_blocks.attn"},
        ),
        dicache_preset="hunyuanvideo",
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            video=True,
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=size_rules,
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={**video_fields(_REAL_LATENT), "text_tokens": 256, "steps": 50},
            named=NAMED_CONFIGS,
            bench={"cpu": "hunyuanvideo-bench", "full": "hunyuanvideo", "tiny": "hunyuanvideo-tiny-fulldepth"},
            tiny="hunyuanvideo-tiny",
        ),
    )
)
