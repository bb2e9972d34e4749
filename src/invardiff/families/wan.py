"""Wan2.1 / Wan2.2 (diffusers ``WanTransformer3DModel``): one list of ``blocks``, each self-attention, cross-attention
and feed-forward.

Units (the official plan keys, SPEC.md A.2.2): ``self_attn`` = ``attn1`` (before its gate), ``cross_attn`` = ``attn2``
(ungated), ``ffn`` (before its gate). The block's modulation, norms and gates are always recomputed from the current
timestep. The step cache holds the tokens entering ``norm_out`` (diffusers hands it ``hidden_states.float()``, so
the cached H is float32 whatever the model's dtype: one tensor per branch, small beside the unit caches).

``WanPipeline`` runs the two classifier-free guidance branches as separate calls inside
``transformer.cache_context("cond" / "uncond")``: each branch has its own state under one plan (the official two
slots, SPEC.md A.4). Wan2.2 (``transformer_2`` with ``boundary_ratio``) switches transformers along the schedule:
each transformer is an expert with its own plan or policy and its own state, over its own part of the schedule
(``invardiff.enable(pipe, {"transformer": plan_high, "transformer_2": plan_low})``).

Around the engine: the official Wan calibration (conditional branch only, corrected step stream, interplay on the
provisional books, SPEC.md A.3), the argparse / debug presets (A.8), the official Wan book layout (A.6) and
random-weight configs from Wan2.1-14B down to test size.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .. import toy_components
from ..plan_file import PlanError, book_table
from .calibration_spec import FamilyCalibration, InvarDiffThresholds
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
    SELF_CROSS_FF_KINDS,
    BlockListSpec,
    ConfigSpec,
    Expert,
    FamilySpec,
    OfficialSpec,
    PipelineSpec,
    self_cross_ff_units,
)
from .table import register_family


def _embed_timestep(transformer, call):
    # The time embedding of WanTransformer3DModel.forward's condition_embedder (its first output), (B, D), or
    # (B, N, D) with one timestep per token (Wan2.2 ti2v): the head's modulation, and the blocks' through time_proj.
    embedder = transformer.condition_embedder
    timestep = call["timestep"]
    sequence = timestep.shape[1] if timestep.ndim == 2 else None
    projected = embedder.timesteps_proj(timestep.flatten())
    if sequence is not None:
        projected = projected.unflatten(0, (-1, sequence))
    embedder_dtype = next(iter(embedder.time_embedder.parameters())).dtype
    if projected.dtype != embedder_dtype and embedder_dtype != torch.int8:
        projected = projected.to(embedder_dtype)
    return embedder.time_embedder(projected).type_as(call["encoder_hidden_states"])


def _run_head(transformer, hidden, call):
    # The output section of WanTransformer3DModel.forward, on the cached tokens: only the time embedding is needed
    # (the text projection feeds the blocks, not the head).
    states = call["hidden_states"]  # (B, C, F, H, W)
    batch, _, frames, height, width = states.shape
    p_t, p_h, p_w = transformer.config.patch_size
    temb = _embed_timestep(transformer, call)
    table = transformer.scale_shift_table.to(temb.device)
    if temb.ndim == 3:
        shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
    shift, scale = shift.to(hidden.device), scale.to(hidden.device)
    # The block stack's dtype is the latent's (the patch embedding keeps it); H itself is float32 here.
    hidden = (transformer.norm_out(hidden.float()) * (1 + scale) + shift).to(states.dtype)
    hidden = transformer.proj_out(hidden)  # (B, N, p_t*p_h*p_w*C)
    hidden = hidden.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    output = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _embed_input(transformer, call):
    patches = transformer.patch_embedding(call["hidden_states"])  # (B, D, F', H', W')
    return patches.flatten(2).transpose(1, 2)  # (B, N, D)


def _thresholds(nonskip, step, self_attn, cross_attn, ffn):
    modules = {"blocks.self_attn": self_attn, "blocks.cross_attn": cross_attn, "blocks.ffn": ffn}
    return InvarDiffThresholds(nonskip, step, modules)


# SPEC.md A.8: the official script's argparse defaults, and the `debug_args` it actually runs with.
PRESETS = {
    "default": _thresholds(0.1, 0.5, 0.5, 0.5, 0.5),
    "debug-args": _thresholds(0.1, 0.58, 0.5, 0.5, 0.5),
}


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction * 1000)  # the scheduler's timestep in [0, 1000]


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    frames, height, width = video_latent_shape(config)
    return {
        "hidden_states": randn(B, kw["in_channels"], frames, height, width),
        "timestep": torch.full((B,), fraction * 1000, device=device, dtype=config.torch_dtype),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["text_dim"]),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, ffn_dim, text_dim=4096, in_channels=16):
    """``WanTransformer3DModel`` arguments of a Wan2.1 text-to-video transformer (patch 1x2x2)."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "text_dim": text_dim,
        "freq_dim": 256,
        "ffn_dim": ffn_dim,
        "num_layers": num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }


# 832x480, 81 frames: a latent of 21 x 60 x 104 (VAE 4x temporal, 8x spatial), 21 x 30 x 52 = 32760 tokens.
_REAL_LATENT = (21, 60, 104)
NAMED_CONFIGS = (
    video_config(
        "wan2.1-1.3b",
        "wan",
        transformer_kwargs(30, 12, 128, 8960),
        _REAL_LATENT,
        text_tokens=512,
        dtype="bfloat16",
        batch=1,
        steps=50,
        description="Wan2.1-T2V-1.3B at 832x480, 81 frames, 512 text tokens (one CFG branch per call)",
    ),
    video_config(
        "wan2.1-14b",
        "wan",
        transformer_kwargs(40, 40, 128, 13824),
        _REAL_LATENT,
        text_tokens=512,
        dtype="bfloat16",
        steps=50,
        description="Wan2.1-T2V-14B at 832x480, 81 frames, 512 text tokens (one CFG branch per call)",
    ),
    video_config(
        "wan-bench",
        "wan",
        transformer_kwargs(30, 4, 64, 1024, text_dim=256),
        (4, 16, 16),
        text_tokens=64,
        steps=50,
        description="Wan2.1-1.3B depth (30), hidden 256, 4 latent frames of 16x16 (256 tokens), 64 text tokens "
        "(CPU benchmark)",
    ),
    video_config(
        "wan-tiny-fulldepth",
        "wan",
        transformer_kwargs(30, 2, 12, 48, text_dim=16, in_channels=4),
        (3, 8, 8),
        text_tokens=8,
        steps=50,
        description="Wan2.1-1.3B depth at hidden 24 (fast CLI tests)",
    ),
    video_config(
        "wan-tiny",
        "wan",
        transformer_kwargs(2, 2, 12, 48, text_dim=16, in_channels=4),
        (3, 8, 8),
        text_tokens=8,
        steps=50,
        description="tests",
    ),
)


def _scheduler() -> UniPCMultistepScheduler:
    # Wan's sampler: UniPC on flow-matching sigmas with shift 5 (SPEC.md B.5, A.8: the t2v defaults).
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)


def toy_parts(config: ModelConfig, text_encoders: bool = False) -> dict:
    """The sampler and text stack of Wan's toy pipelines (``WanPipeline``, ``WanVACEPipeline``): with
    ``text_encoders``, a tiny random UMT5 encoder and a tokenizer built in code, else none (the pipeline then runs
    from ``prompt_embeds`` / ``negative_prompt_embeds``)."""
    encoders = _tiny_text_encoder(config) if text_encoders else {"tokenizer": None, "text_encoder": None}
    return {"scheduler": _scheduler(), **encoders}


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False, transformer_2=None, boundary=None):
    # No VAE (latents out).
    from diffusers import WanPipeline

    parts = toy_parts(config, text_encoders)
    return WanPipeline(
        vae=None, transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary, **parts
    )


def _tiny_text_encoder(config: ModelConfig, seed: int = 0) -> dict:

    tokenizer = toy_components.t5_tokenizer(words=[])
    encoder = toy_components.umt5_encoder(len(tokenizer), config.transformer_kwargs["text_dim"], seed)
    return {"tokenizer": tokenizer, "text_encoder": encoder}


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    frames, height, width = video_latent_shape(config)
    text_dim = config.transformer_kwargs["text_dim"]
    embeds = torch.randn(2, config.batch, config.text_tokens, text_dim, generator=generator)
    return {
        "prompt_embeds": embeds[0].to(device, config.torch_dtype),
        "negative_prompt_embeds": embeds[1].to(device, config.torch_dtype),
        **video_pipeline_size(config),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 5.0,  # classifier-free guidance: a cond and an uncond call per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    return video_call_fields(pipe, call_kwargs, (480, 832, 81), 512, tuple(transformer.config.patch_size))


def _size_rules(pipe) -> dict:
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    return video_size_rules(pipe, tuple(transformer.config.patch_size))


def _experts(pipe) -> tuple[Expert, ...]:
    # WanPipeline with transformer_2 and boundary_ratio (Wan2.2 A14B): `transformer` runs the timesteps
    # t >= boundary_ratio * num_train_timesteps (high noise, the first steps), `transformer_2` the rest.
    if getattr(pipe, "transformer_2", None) is None or pipe.config.boundary_ratio is None:
        return ()
    return (Expert("transformer", _high_noise_steps), Expert("transformer_2", _low_noise_steps))


def _boundary_count(pipe, timesteps: torch.Tensor) -> int:
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return int((timesteps >= boundary).sum())  # one host read per pipeline call


def _high_noise_steps(pipe, timesteps: torch.Tensor) -> slice:
    return slice(0, _boundary_count(pipe, timesteps))


def _low_noise_steps(pipe, timesteps: torch.Tensor) -> slice:
    return slice(_boundary_count(pipe, timesteps), len(timesteps))


def _official_reuse(book: dict) -> dict:
    reuse = book_table(book, "module_cache_book")
    if set(reuse) != set(SELF_CROSS_FF_KINDS):
        wanted = list(SELF_CROSS_FF_KINDS)
        raise PlanError(f"A Wan book's 'module_cache_book' needs exactly the kinds {wanted}, got {sorted(reuse)}.")
    shapes = {kind: matrix.shape for kind, matrix in reuse.items()}
    if len(set(shapes.values())) != 1:
        raise PlanError(f"The Wan book's module books must all be T x L of one shape, got {shapes}.")
    return {"blocks": reuse}


def _official_book(plan) -> dict:
    # The layout the official Wan sampler loads (SPEC.md A.6): step_cache_bool and module_cache_book.
    reuse = plan.module_reuse["blocks"]
    return {
        "step_cache_bool": plan.step_cache.tolist(),
        "module_cache_book": {kind: np.asarray(reuse[kind]).tolist() for kind in SELF_CROSS_FF_KINDS},
    }


OFFICIAL = OfficialSpec(
    label="Wan",
    scheduler="FlowUniPCMultistepScheduler",
    keys=("module_cache_book",),
    reuse=_official_reuse,
    step_keys=("step_cache_bool", "step_cache_book"),  # the official loader accepts either name
    write=_official_book,
)


WAN = register_family(
    FamilySpec(
        name="wan",
        transformer_class=WanTransformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="blocks",
                module_kinds=SELF_CROSS_FF_KINDS,
                units=self_cross_ff_units("ffn"),
                # The rotary embedding has one row for the whole batch; text and modulation are per sample.
                per_sample_args=("encoder_hidden_states", "temb"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=_embed_input,
        embed_timestep=_embed_timestep,
        # SPEC.md A.3: the step stream is corrected, the provisional books force the warm-up and get the
        # step-to-module interplay, and only the conditional branch is recorded (the official code records the
        # even-numbered calls).
        calibration=FamilyCalibration(
            correct_step=True,
            provisional_module_warmup=True,
            provisional_interplay=True,
            record_branches=("cond",),
        ),
        presets=PRESETS,
        dicache_preset="wan2.1",
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            video=True,
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent", "guidance_scale": 5.0},
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=_size_rules,
            toy_call_kwargs=_toy_call_kwargs,
            experts=_experts,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            # A config.json says nothing of the call: 832x480, 81 frames, 512 text tokens, 50 steps.
            json_defaults={**video_fields(_REAL_LATENT), "text_tokens": 512, "steps": 50},
            named=NAMED_CONFIGS,
            bench={"cpu": "wan-bench", "full": "wan2.1-1.3b", "tiny": "wan-tiny-fulldepth"},
            tiny="wan-tiny",
        ),
        official=OFFICIAL,
    )
)
