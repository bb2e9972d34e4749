"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``): one list of MMDiT ``transformer_blocks``.

Units of a joint block: the joint attention (image and text in one call, reused only when both ``attn`` and
``context_attn`` are set), SD3.5-Medium's second, image-only attention ``attn2`` (its dual-attention blocks only),
the image feed-forward ``ff`` and the text feed-forward ``ff_context``. The last block is ``context_pre_only``: it has
no ``ff_context`` (and the text it computes is dropped), so its spec says so (``ReuseUnit.present``) and plans' bits
for that unit there are ignored. Norms, modulation and gates always run; the step cache holds the image tokens
entering ``norm_out``.

``StableDiffusion3Pipeline`` batches the classifier-free guidance branches in one call (negative rows first). There is
no official InvarDiff or DiCache code for SD3: calibration follows the generic official behaviour (DiT/Wan) with
``context_attn`` tied to ``attn``, and DiCache runs FLUX's rules.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .calibration_spec import FamilyCalibration
from .model_config import ModelConfig
from .spec import BlockListSpec, ConfigSpec, FamilySpec, PipelineSpec, ReuseUnit, image_output_index
from .table import register_family


def _embed_timestep(transformer, call):
    # SD3Transformer2DModel.forward's conditioning: the temb every block and the head take, (B, D).
    return transformer.time_text_embed(call["timestep"], call["pooled_projections"])


def _run_head(transformer, hidden, call):
    # The output section of SD3Transformer2DModel.forward, on the cached image tokens.
    height, width = call["hidden_states"].shape[-2:]
    hidden = transformer.proj_out(transformer.norm_out(hidden, _embed_timestep(transformer, call)))  # (B, N, p*p*C)
    patch, channels = transformer.config.patch_size, transformer.out_channels
    hidden = hidden.reshape(hidden.shape[0], height // patch, width // patch, patch, patch, channels)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    output = hidden.reshape(hidden.shape[0], channels, height, width)  # (B, C, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction * 1000)  # the flow-matching timestep in [0, 1000]


def _latent_side(config: ModelConfig) -> int:
    return int(config.image_tokens**0.5) * config.transformer_kwargs["patch_size"]


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    side = _latent_side(config)
    return {
        "hidden_states": randn(B, kw["in_channels"], side, side),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["joint_attention_dim"]),
        "pooled_projections": randn(B, kw["pooled_projection_dim"]),
        "timestep": torch.full((B,), fraction * 1000, device=device, dtype=config.torch_dtype),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, caption_dim, pos_embed_max_size, dual=(), qk_norm="rms_norm", **other):
    """``SD3Transformer2DModel`` arguments (patch 2, 16 latent channels; head size 64 unless given)."""
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": num_layers,
        "attention_head_dim": 64,
        "num_attention_heads": heads,
        "joint_attention_dim": 4096,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": pos_embed_max_size,
        "dual_attention_layers": tuple(dual),
        "qk_norm": qk_norm,
        **other,
    }


_TINY = {
    "attention_head_dim": 8,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
}
NAMED_CONFIGS = (
    # The published transformer/config.json of stabilityai/stable-diffusion-3.5-large and -medium, at 1024x1024
    # (a 128x128 latent: 4096 tokens of 2x2 patches) with 333 text tokens (77 CLIP + 256 T5), batched CFG.
    ModelConfig(
        "sd3.5-large",
        "sd3",
        transformer_kwargs(38, 38, 2432, 192),
        "bfloat16",
        image_tokens=4096,
        text_tokens=333,
        batch=2,
        description="SD3.5-Large (38 joint blocks, hidden 2432) at 1024x1024, batched CFG",
    ),
    ModelConfig(
        "sd3.5-medium",
        "sd3",
        transformer_kwargs(24, 24, 1536, 384, dual=range(13)),
        "bfloat16",
        image_tokens=4096,
        text_tokens=333,
        batch=2,
        description="SD3.5-Medium (24 joint blocks, the first 13 with dual attention, hidden 1536) at 1024x1024",
    ),
    ModelConfig(
        "sd3-bench",
        "sd3",
        transformer_kwargs(24, 4, 256, 192, dual=range(13)),
        image_tokens=256,
        text_tokens=64,
        batch=2,
        description="SD3.5-Medium depth (24, dual attention in the first 13), hidden 256, 256 image + 64 text tokens, "
        "batched CFG (CPU benchmark)",
    ),
    ModelConfig(
        "sd3-tiny",
        "sd3",
        transformer_kwargs(3, 2, 16, 16, dual=(0,), sample_size=8, **_TINY),
        image_tokens=16,
        text_tokens=8,
        batch=2,
        description="tests: 3 blocks, the first with dual attention, the last without ff_context",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler config


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import StableDiffusion3Pipeline

    if text_encoders:
        raise NotImplementedError(
            "The SD3 toy pipeline has no text encoders (three encoders with their tokenizers); call it with "
            "prompt_embeds and pooled_prompt_embeds (and their negatives)."
        )
    encoders = {name: None for i in ("", "_2", "_3") for name in (f"text_encoder{i}", f"tokenizer{i}")}
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=_scheduler(), vae=None, **encoders)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    samples = max(1, config.batch // 2)  # batch = samples x CFG halves
    embeds = torch.randn(2, samples, config.text_tokens, kw["joint_attention_dim"], generator=generator)
    pooled = torch.randn(2, samples, kw["pooled_projection_dim"], generator=generator)
    cast = {"device": device, "dtype": config.torch_dtype}
    side = _latent_side(config) * 8  # the pipeline's VAE factor without a VAE
    return {
        "prompt_embeds": embeds[0].to(**cast),
        "pooled_prompt_embeds": pooled[0].to(**cast),
        "negative_prompt_embeds": embeds[1].to(**cast),
        "negative_pooled_prompt_embeds": pooled[1].to(**cast),
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 5.0,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    default = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = call_kwargs.get("height") or default, call_kwargs.get("width") or default
    cfg = call_kwargs.get("guidance_scale", 7.0) > 1
    text = 77 + (call_kwargs.get("max_sequence_length") or 256)
    return {"image_tokens": (height // factor) * (width // factor), "text_tokens": text, "batch": 2 if cfg else 1}


SD3 = register_family(
    FamilySpec(
        name="sd3",
        transformer_class=SD3Transformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=("attn", "context_attn", "attn2", "ff", "context_ff"),
                units=(
                    ReuseUnit("attn", ("attn", "context_attn"), "attn", kind_outputs=(0, 1)),
                    ReuseUnit("attn2", ("attn2",), "attn2", present=lambda block: block.attn2 is not None),
                    ReuseUnit("ff", ("ff",), "ff"),
                    ReuseUnit(
                        "context_ff", ("context_ff",), "ff_context", present=lambda block: block.ff_context is not None
                    ),
                ),
                image_output=image_output_index(JointTransformerBlock),
                per_sample_args=("temb",),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.pos_embed(call["hidden_states"]),  # (B, N, D)
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(
            correct_step=True,
            provisional_module_warmup=True,
            tied_kinds={"transformer_blocks.context_attn": "transformer_blocks.attn"},
        ),
        dicache_preset="flux",  # no official DiCache setting for SD3: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=_call_shape,
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={"image_tokens": 4096, "text_tokens": 333, "batch": 2},
            named=NAMED_CONFIGS,
            bench={"cpu": "sd3-bench", "full": "sd3.5-large", "tiny": "sd3-tiny"},
            tiny="sd3-tiny",
        ),
    )
)
