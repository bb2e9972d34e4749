"""FLUX.1 (diffusers ``FluxTransformer2DModel``): 19 dual-stream blocks, then 38 single-stream blocks.

Dual blocks: the joint attention (image and text together) is one call, reused only when both ``attn`` and
``context_attn`` are set; ``ff`` (image) and ``context_ff`` (text) feed-forwards. Single blocks (which take text
and image separately since diffusers 0.35): ``attn`` and ``mlp`` = ``act_mlp(proj_mlp(x))``; their ``proj_out``
over the concatenation, the norm and the gate are always paid. The step cache holds the image tokens entering
``norm_out``.

Around the engine: text-conditioned pipelines (``FluxPipeline``, distilled guidance as an input), the official
FLUX.1-dev presets and books (SPEC.md A.6, A.8), and random-weight configs from FLUX.1-dev down to test size.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from .. import toy_components
from ..plan_file import PlanError, book_table
from .calibration_spec import FamilyCalibration, InvarDiffThresholds
from .model_config import ModelConfig
from .spec import (
    DUAL_STREAM_KINDS,
    BlockListSpec,
    ConfigSpec,
    FamilySpec,
    OfficialSpec,
    PipelineSpec,
    ReuseUnit,
    SizeRule,
    dual_stream_units,
    image_output_index,
)
from .table import register_family


def _temb(transformer, call, dtype):
    # FluxTransformer2DModel.forward's conditioning: timestep (and distilled guidance) x 1000 in the block stack's
    # dtype, with the pooled text.
    timestep = call["timestep"].to(dtype) * 1000
    guidance = call["guidance"]
    pooled = call["pooled_projections"]
    if guidance is None:
        return transformer.time_text_embed(timestep, pooled)  # (B, D)
    return transformer.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)


def _embed_timestep(transformer, call):
    # The temb every block and the head take.
    return _temb(transformer, call, call["hidden_states"].dtype)


def _run_head(transformer, hidden, call):
    # The output section of FluxTransformer2DModel.forward, on the cached image tokens.
    output = transformer.proj_out(transformer.norm_out(hidden, _temb(transformer, call, hidden.dtype)))  # (B, N, C)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def input_signature(call):
    """The shapes that stay constant within a run: image and text tokens (also Chroma's)."""
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _thresholds(nonskip, step, attn, ff, context_ff, single_attn, single_mlp):
    return InvarDiffThresholds(
        nonskip,
        step,
        {
            "transformer_blocks.attn": attn,
            "transformer_blocks.ff": ff,
            "transformer_blocks.context_ff": context_ff,
            "single_transformer_blocks.attn": single_attn,
            "single_transformer_blocks.mlp": single_mlp,
        },
    )


# The official presets (SPEC.md A.8): the FLUX README speed modes.
PRESETS = {
    "fast": _thresholds(0.1, 0.7, 0.68, 0.68, 0.68, 0.68, 0.68),
    "medium-1": _thresholds(0.1, 0.7, 0.68, 0, 0, 0.68, 0),
    "medium-2": _thresholds(0.15, 0.7, 0.68, 0, 0, 0.7, 0),
    "slow": _thresholds(0.22, 0.72, 0.68, 0.66, 0, 0.68, 0.62),
}


def call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    """The ``timestep`` argument at ``fraction`` of the trajectory (FLUX-like pipelines, Chroma's too)."""
    return torch.full_like(like, fraction)  # the pipeline passes the flow-matching sigma, t / 1000


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    return {
        "hidden_states": randn(B, config.image_tokens, kw["in_channels"]),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["joint_attention_dim"]),
        "pooled_projections": randn(B, kw["pooled_projection_dim"]),
        "timestep": torch.full((B,), fraction, device=device, dtype=dtype),
        "guidance": torch.full((B,), 3.5, device=device, dtype=dtype) if kw.get("guidance_embeds") else None,
        "img_ids": torch.zeros(config.image_tokens, 3, device=device),
        "txt_ids": torch.zeros(config.text_tokens, 3, device=device),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, num_single_layers, heads, head_dim, axes, joint_dim, pooled_dim, in_channels=64):
    """``FluxTransformer2DModel`` arguments of a FLUX.1-dev-like transformer (guidance-distilled, patch size 1)."""
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint_dim,
        "pooled_projection_dim": pooled_dim,
        "guidance_embeds": True,
        "axes_dims_rope": axes,
    }


NAMED_CONFIGS = (
    ModelConfig(
        "flux1-dev",
        "flux",
        transformer_kwargs(19, 38, 24, 128, (16, 56, 56), 4096, 768),
        "bfloat16",
        image_tokens=4096,
        text_tokens=512,
        description="FLUX.1-dev at 1024x1024, 512 text tokens",
    ),
    ModelConfig(
        "flux-bench",
        "flux",
        transformer_kwargs(19, 38, 4, 64, (16, 24, 24), 256, 256),
        image_tokens=256,
        text_tokens=64,
        description="FLUX depth (19+38), hidden 256, 256 image + 64 text tokens (CPU benchmark)",
    ),
    ModelConfig(
        "flux-tiny",
        "flux",
        transformer_kwargs(2, 4, 2, 16, (4, 6, 6), 32, 32, in_channels=16),
        image_tokens=64,
        text_tokens=8,
        description="tests",
    ),
    ModelConfig(
        "flux-tiny-fulldepth",
        "flux",
        transformer_kwargs(19, 38, 2, 16, (4, 6, 6), 32, 32, in_channels=16),
        image_tokens=64,
        text_tokens=8,
        description="FLUX depth at hidden 32 (fast CLI tests)",
    ),
    ModelConfig(
        "flux-calib-1024",
        "flux",
        transformer_kwargs(4, 8, 4, 64, (16, 24, 24), 256, 256),
        image_tokens=1024,
        text_tokens=64,
        description="hidden 256, 4+8 blocks, 1024 image tokens (512x512 px): calibration memory benchmark",
    ),
)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    # Without text encoders the pipeline runs from prompt_embeds; with them, tiny random CLIP and T5 encoders with
    # tokenizers built in code make `pipe(prompt=...)` work offline.
    from diffusers import FluxPipeline

    names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    encoders = _tiny_text_encoders(config) if text_encoders else dict.fromkeys(names)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=transformer, **encoders)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    side = int(config.image_tokens**0.5) * 16  # 16 px per packed latent token (VAE x8, 2x2 packing)
    embeds = torch.randn(config.batch, config.text_tokens, kw["joint_attention_dim"], generator=generator)
    pooled = torch.randn(config.batch, kw["pooled_projection_dim"], generator=generator)
    return {
        "prompt_embeds": embeds.to(device, config.torch_dtype),
        "pooled_prompt_embeds": pooled.to(device, config.torch_dtype),
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 3.5,
        "output_type": "latent",  # packed latents: there is no VAE
        "generator": generator,
    }


def _toy_cfg_kwargs(config: ModelConfig, seed: int, device) -> dict:
    # True CFG (FluxPipeline's negative prompt): a cond and an uncond call per step, in separate cache contexts.
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)  # not the prompt's draw
    kw = config.transformer_kwargs
    embeds = torch.randn(config.batch, config.text_tokens, kw["joint_attention_dim"], generator=generator)
    pooled = torch.randn(config.batch, kw["pooled_projection_dim"], generator=generator)
    return {
        "negative_prompt_embeds": embeds.to(device, config.torch_dtype),
        "negative_pooled_prompt_embeds": pooled.to(device, config.torch_dtype),
        "true_cfg_scale": 2.0,
    }


def call_shape(pipe, call_kwargs: dict) -> dict:
    """Image and text tokens of one call of a FLUX-like pipeline (packed latents, 512 T5 tokens by default)."""
    pixels_per_token = 2 * pipe.vae_scale_factor  # VAE downsampling, then 2x2 packing
    default_side = pipe.default_sample_size * pipe.vae_scale_factor
    height = call_kwargs.get("height") or default_side
    width = call_kwargs.get("width") or default_side
    tokens = (height // pixels_per_token) * (width // pixels_per_token)
    return {"image_tokens": tokens, "text_tokens": call_kwargs.get("max_sequence_length") or 512}


def size_rules(pipe) -> dict[str, SizeRule]:
    """Height and width of a FLUX-like pipeline: multiples of the VAE factor times the 2x2 packing."""
    side = SizeRule(
        2 * pipe.vae_scale_factor, f"the VAE's downsampling {pipe.vae_scale_factor} x the 2x2 latent packing"
    )
    return {"height": side, "width": side}  # FluxPipeline would resize other sizes with a warning


def _tiny_text_encoders(config: ModelConfig, seed: int = 0) -> dict:

    clip_tokenizer, t5_tokenizer = toy_components.clip_tokenizer(), toy_components.t5_tokenizer(words=[])
    kw = config.transformer_kwargs
    clip, t5 = toy_components.text_encoders(
        len(clip_tokenizer), len(t5_tokenizer), kw["pooled_projection_dim"], seed, t5_width=kw["joint_attention_dim"]
    )
    return {"text_encoder": clip, "tokenizer": clip_tokenizer, "text_encoder_2": t5, "tokenizer_2": t5_tokenizer}


def _official_reuse(book: dict) -> dict:
    dual = book_table(book, "transformer_cache_book")
    single = book_table(book, "single_transformer_cache_book")
    # ip_attn (IP-adapter attention, absent without an adapter) equals attn in every shipped book.
    ip_attn = dual.pop("ip_attn", None)
    if ip_attn is not None and not np.array_equal(ip_attn, dual.get("attn")):
        raise PlanError("The book's ip_attn differs from attn; IP-adapter plans are not supported.")
    return {"transformer_blocks": dual, "single_transformer_blocks": single}


def _official_book(plan) -> dict:
    # The layout the official FLUX sampler loads (SPEC.md A.6): one book per block list, one T x L table per kind.
    reuse = plan.module_reuse
    return {
        "step_cache_book": plan.step_cache.tolist(),
        "transformer_cache_book": {k: np.asarray(m).tolist() for k, m in reuse["transformer_blocks"].items()},
        "single_transformer_cache_book": {
            k: np.asarray(m).tolist() for k, m in reuse["single_transformer_blocks"].items()
        },
    }


_BOOKS = "flux1-dev/cache_books_stp28_"
OFFICIAL = OfficialSpec(
    label="FLUX",
    scheduler="FlowMatchEulerDiscreteScheduler",
    keys=("transformer_cache_book", "single_transformer_cache_book"),
    reuse=_official_reuse,
    books={
        "fast": _BOOKS + "n0.1_th0.7_attn0.68_ff0.68_ctxff0.68_sattn0.68_smlp0.68.json",
        "medium-1": _BOOKS + "n0.1_th0.7_attn0.68_ff0_ctxff0_sattn0.68_smlp0.json",
        "medium-2": _BOOKS + "n0.15_th0.7_attn0.68_ff0_ctxff0_sattn0.7_smlp0.json",
        "slow": _BOOKS + "n0.22_th0.72_attn0.68_ff0.66_ctxff0_sattn0.68_smlp0.62.json",
    },
    write=_official_book,
)


FLUX = register_family(
    FamilySpec(
        name="flux",
        transformer_class=FluxTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=DUAL_STREAM_KINDS,
                units=dual_stream_units(),
                image_output=image_output_index(FluxTransformerBlock),
                per_sample_args=("temb",),
            ),
            BlockListSpec(
                attr="single_transformer_blocks",
                module_kinds=("attn", "mlp"),
                units=(
                    ReuseUnit("attn", ("attn",), "attn"),
                    ReuseUnit("mlp", ("mlp",), "proj_mlp", passthrough="act_mlp"),
                ),
                image_output=image_output_index(FluxSingleTransformerBlock),
                per_sample_args=("temb",),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1000.0,
        run_head=_run_head,
        input_signature=input_signature,
        embed_input=lambda transformer, call: transformer.x_embedder(call["hidden_states"]),  # (B, N_img, D)
        embed_timestep=_embed_timestep,
        # The official FLUX code keeps its first-pass step gate, forces only step 0 (and the last step) in the
        # provisional module books, and ties context_attn to attn (the joint attention is one call).
        calibration=FamilyCalibration(
            correct_step=False,
            provisional_module_warmup=False,
            tied_kinds={"transformer_blocks.context_attn": "transformer_blocks.attn"},
        ),
        presets=PRESETS,
        dicache_preset="flux",
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=FlowMatchEulerDiscreteScheduler,
            calibration_kwargs={"output_type": "latent"},  # the decoded images are not needed
            build_toy=_build_toy,
            call_shape=call_shape,
            size_rules=size_rules,
            toy_call_kwargs=_toy_call_kwargs,
            toy_cfg_kwargs=_toy_cfg_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=call_timestep,
            json_defaults={"image_tokens": 4096, "text_tokens": 512},  # 1024x1024 px, 512 T5 tokens
            named=NAMED_CONFIGS,
            bench={"cpu": "flux-bench", "full": "flux1-dev", "tiny": "flux-tiny-fulldepth"},
            tiny="flux-tiny",
        ),
        official=OFFICIAL,
    )
)
