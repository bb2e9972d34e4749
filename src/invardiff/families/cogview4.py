"""CogView4 (diffusers ``CogView4Transformer2DModel``): one list of ``transformer_blocks`` over text and image tokens.

Each block modulates both streams (``norm1``: an adaptive LayerNorm-zero with separate text and image scales, shifts
and gates), runs one joint attention ``attn1`` over the concatenated text and image tokens (returning ``(image,
text)``), then one feed-forward ``ff``, whose weights the two streams share: the block calls it twice, on the image
tokens and then on the text tokens. Units: the joint attention only (kinds ``attn`` and ``context_attn``, reused
together). The feed-forward is not a unit: the engine caches one output per unit and call of a block, and a module
called twice per block (two token sets) would have the second call's output returned for both; it always runs, and
its FLOPs are paid by every executed step. The norms, modulation and gates always run; the step cache holds the
image tokens entering ``norm_out`` (the text stream after the last block is dropped).

``CogView4Pipeline`` runs classifier-free guidance as two calls per step, in ``cache_context("cond" / "uncond")``:
one state per branch under one plan. Its negative prompt is encoded to its own length (GLM tokens, padded up to a
multiple of 16), so the two branches may have different text lengths. The timestep it passes is the flow-matching
timestep in [0, 1000] (``sigma * 1000``).

There is no official InvarDiff or DiCache code for CogView4: calibration follows the generic official behaviour
(DiT/Wan) with ``context_attn`` tied to ``attn``, and DiCache runs FLUX's rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_cogview4 import CogView4TransformerBlock

from .calibration_spec import FamilyCalibration
from .flux import input_signature, size_rules
from .model_config import ModelConfig
from .spec import BlockListSpec, ConfigSpec, FamilySpec, PipelineSpec, image_output_index, joint_attention_unit
from .table import register_family


# No official code: the generic official calibration (DiT/Wan), with the joint attention's two kinds tied (one call).
JOINT_CALIBRATION = FamilyCalibration(
    correct_step=True,
    provisional_module_warmup=True,
    tied_kinds={"transformer_blocks.context_attn": "transformer_blocks.attn"},
)


def _temb(transformer, call, dtype):
    # CogView4Transformer2DModel.forward's time_condition_embed (B, D), in the block stack's dtype; the forward
    # hands every block and the head its SiLU.
    return transformer.time_condition_embed(
        call["timestep"], call["original_size"], call["target_size"], call["crop_coords"], dtype
    )


def _embed_timestep(transformer, call):
    return _temb(transformer, call, call["hidden_states"].dtype)  # the patch embedding keeps the latent's dtype


def _run_head(transformer, hidden, call):
    # The output section of CogView4Transformer2DModel.forward, on the cached image tokens. The conditioning is
    # embedded in the block stack's dtype, which is the cached tokens' dtype.
    batch, _, height, width = call["hidden_states"].shape
    p = transformer.config.patch_size
    temb = _temb(transformer, call, hidden.dtype)
    hidden = transformer.proj_out(transformer.norm_out(hidden, F.silu(temb)))  # (B, N, p*p*C)
    hidden = hidden.reshape(batch, height // p, width // p, -1, p, p)
    output = hidden.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)  # (B, C, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _embed_input(transformer, call):
    image, _ = transformer.patch_embed(call["hidden_states"], call["encoder_hidden_states"])
    return image  # (B, N, D)


def call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    """The ``timestep`` argument at ``fraction`` of the trajectory: the scheduler's timestep in [0, 1000] (CogView4's
    flow-matching timestep; also what CogVideoX's DDIM-style schedulers pass, as an integer, by the same scale)."""
    return torch.full_like(like, fraction * 1000)


def _latent_side(config: ModelConfig) -> int:
    return int(config.image_tokens**0.5) * config.transformer_kwargs["patch_size"]


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    side = _latent_side(config)
    pixels = torch.full((B, 2), side * 8.0, device=device, dtype=dtype)  # the pipeline's (height, width), VAE x8
    return {
        "hidden_states": randn(B, kw["in_channels"], side, side),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["text_embed_dim"]),
        "timestep": torch.full((B,), fraction * 1000, device=device, dtype=dtype),
        "original_size": pixels,
        "target_size": pixels.clone(),
        "crop_coords": torch.zeros(B, 2, device=device, dtype=dtype),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, text_dim=4096, time_dim=512, condition_dim=256, in_channels=16):
    """``CogView4Transformer2DModel`` arguments (patch 2, 2D rotary over a 256 x 256 grid)."""
    return {
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "text_embed_dim": text_dim,
        "time_embed_dim": time_dim,
        "condition_dim": condition_dim,
        "pos_embed_max_size": 128,
        "sample_size": 128,
        "rope_axes_dim": (256, 256),
    }


NAMED_CONFIGS = (
    # THUDM/CogView4-6B transformer/config.json: 28 layers, 32 heads of 128 (hidden 4096), GLM-4-9B text embeddings
    # of 4096, time embedding 512, condition embedding 256, patch 2, 16 latent channels, pos_embed_max_size and
    # sample_size 128, rope_axes_dim (256, 256) (the diffusers defaults). Not checked against the hub file (no
    # network here): taken from diffusers' CogView4 conversion script, which builds the 6B model with these values,
    # and the default sample_size / rope_axes_dim. At 1024x1024 (the pipeline's default: sample_size x VAE 8): a
    # 128x128 latent, 4096 tokens of 2x2 patches. The text length is the prompt's own (GLM tokens padded up to a
    # multiple of 16, at most 1024): 128 is a nominal prompt. CFG: two calls of one row per step.
    ModelConfig(
        "cogview4-6b",
        "cogview4",
        transformer_kwargs(28, 32, 128),
        "bfloat16",
        image_tokens=4096,
        text_tokens=128,
        steps=50,
        description="CogView4-6B (28 joint blocks, hidden 4096) at 1024x1024, 128 text tokens (one CFG branch per "
        "call)",
    ),
    ModelConfig(
        "cogview4-bench",
        "cogview4",
        transformer_kwargs(28, 4, 64, text_dim=256),
        image_tokens=256,
        text_tokens=64,
        steps=50,
        description="CogView4-6B depth (28), hidden 256, 256 image + 64 text tokens (CPU benchmark)",
    ),
    ModelConfig(
        "cogview4-tiny-fulldepth",
        "cogview4",
        transformer_kwargs(28, 2, 8, text_dim=16, time_dim=16, condition_dim=4, in_channels=4),
        image_tokens=16,
        text_tokens=8,
        steps=50,
        description="CogView4-6B depth at hidden 16 (fast CLI tests)",
    ),
    ModelConfig(
        "cogview4-tiny",
        "cogview4",
        transformer_kwargs(2, 2, 8, text_dim=16, time_dim=16, condition_dim=4, in_channels=4),
        image_tokens=16,
        text_tokens=8,
        steps=50,
        description="tests",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # CogView4-6B's scheduler config: resolution-dependent shift mu from the image tokens, applied linearly.
    return FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import CogView4Pipeline

    if text_encoders:
        raise NotImplementedError(
            "The CogView4 toy pipeline has no text encoder (GLM-4 with its tokenizer); call it with prompt_embeds and "
            "negative_prompt_embeds."
        )
    return CogView4Pipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=_scheduler()
    )


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    text_dim, L = config.transformer_kwargs["text_embed_dim"], config.text_tokens
    # One length for both prompts: the config's call shape, which the FLOP profile of each call assumes (a real
    # negative prompt is encoded to its own length; each branch keeps its own shape through the run).
    embeds, negative = torch.randn(2, config.batch, L, text_dim, generator=generator)
    side = _latent_side(config) * 8  # the pipeline's VAE factor without a VAE
    return {
        "prompt_embeds": embeds.to(device, config.torch_dtype),
        "negative_prompt_embeds": negative.to(device, config.torch_dtype),
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 5.0,  # classifier-free guidance: a cond and an uncond call per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    default = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    height, width = call_kwargs.get("height") or default, call_kwargs.get("width") or default
    embeds = call_kwargs.get("prompt_embeds")
    text = embeds.shape[1] if embeds is not None else 128  # the prompt's own length; 128 nominal (NAMED_CONFIGS)
    return {"image_tokens": (height // factor) * (width // factor), "text_tokens": text, "batch": 1}


COGVIEW4 = register_family(
    FamilySpec(
        name="cogview4",
        transformer_class=CogView4Transformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=("attn", "context_attn"),
                units=(joint_attention_unit("attn1"),),
                image_output=image_output_index(CogView4TransformerBlock),
                per_sample_args=("temb", "attention_mask"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=input_signature,
        embed_input=_embed_input,
        embed_timestep=_embed_timestep,
        calibration=JOINT_CALIBRATION,
        dicache_preset="flux",  # no official DiCache setting for CogView4: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=size_rules,  # CogView4Pipeline refuses sides that are not multiples of 16 = VAE 8 x patch 2
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=call_timestep,
            json_defaults={"image_tokens": 4096, "text_tokens": 128, "steps": 50},  # 1024x1024, a nominal prompt
            named=NAMED_CONFIGS,
            bench={"cpu": "cogview4-bench", "full": "cogview4-6b", "tiny": "cogview4-tiny-fulldepth"},
            tiny="cogview4-tiny",
        ),
    )
)
