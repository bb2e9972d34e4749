"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``): one list of 60 dual-stream MMDiT ``transformer_blocks``.

Units of a block: the joint attention (image and text in one call, reused only when both ``attn`` and
``context_attn`` are set), the image feed-forward ``img_mlp`` (kind ``ff``) and the text feed-forward ``txt_mlp``
(kind ``context_ff``). Every block has every unit. Norms, modulation and gates always run; the step cache holds the
image tokens entering ``norm_out``.

``QwenImagePipeline`` runs true classifier-free guidance as two transformer calls per step (``cache_context("cond")``
then ``"uncond"``), passing ``t / 1000`` as the timestep. The toy pipeline runs from ``prompt_embeds`` without its
Qwen2.5-VL text encoder and without a VAE (``output_type="latent"``); ``pipe(prompt=...)`` needs the real encoder,
which cannot be built small offline. There is no official InvarDiff or DiCache code for Qwen-Image: calibration follows
the generic official behaviour (DiT/Wan) with ``context_attn`` tied to ``attn``, and DiCache runs FLUX's rules.

Not supported: ``zero_cond_t`` transformers (Qwen-Image-Edit-2511). Their blocks take a timestep embedding of twice
the batch (the real and a zero timestep) and a per-token modulation index, which the engine's per-sample row cuts
(DiCache's per-sample decisions) cannot split; ``invardiff.enable`` refuses them with ``NotImplementedError``.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

from .calibration_spec import FamilyCalibration
from .flux import call_shape, size_rules
from .model_config import ModelConfig
from .spec import (
    DUAL_STREAM_KINDS,
    BlockListSpec,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    dual_stream_units,
    image_output_index,
)
from .table import register_family


def _supported(block) -> bool:
    # Every block has every unit: this is the one check that runs on each block at enable (and in FLOP profiles),
    # so an unsupported variant is refused there, before anything is installed.
    if block.zero_cond_t:
        raise NotImplementedError(
            "invardiff does not support QwenImageTransformer2DModel with zero_cond_t=True (Qwen-Image-Edit-2511): "
            "its blocks take a doubled timestep embedding that per-sample caching cannot split; use a transformer "
            "with zero_cond_t=False (Qwen-Image)."
        )
    return True


def _temb(transformer, call, like):
    # QwenImageTransformer2DModel.forward's conditioning (zero_cond_t=False, see _supported); `like` gives the block
    # stack's dtype (time_text_embed reads only its dtype).
    timestep = call["timestep"].to(like.dtype)
    guidance = call["guidance"]
    if guidance is None:
        return transformer.time_text_embed(timestep, like, call["additional_t_cond"])  # (B, D)
    # The stock forward's call, kept as it is (the guidance-distilled variant has no published weights).
    return transformer.time_text_embed(timestep, guidance.to(like.dtype) * 1000, like, call["additional_t_cond"])


def _embed_timestep(transformer, call):
    # The temb every block and the head take.
    return _temb(transformer, call, call["hidden_states"])


def _run_head(transformer, hidden, call):
    # The output section of QwenImageTransformer2DModel.forward, on the cached image tokens.
    output = transformer.proj_out(transformer.norm_out(hidden, _temb(transformer, call, hidden)))  # (B, N, p*p*C)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction)  # the pipeline passes the flow-matching sigma, t / 1000


def _latent_side(config: ModelConfig) -> int:
    side = round(config.image_tokens**0.5)  # packed latent tokens per side (2x2 patches of the VAE latent)
    if side * side != config.image_tokens:
        raise ValueError(
            f"Config {config.name!r}: image_tokens={config.image_tokens} is not a square; Qwen-Image example calls "
            f"use square images, so give a square number of tokens (e.g. {side * side})."
        )
    return side


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    side = _latent_side(config)
    return {
        "hidden_states": randn(B, config.image_tokens, kw["in_channels"]),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["joint_attention_dim"]),
        "encoder_hidden_states_mask": None,  # the pipeline drops an all-ones mask
        "timestep": torch.full((B,), fraction, device=device, dtype=dtype),
        "img_shapes": [[(1, side, side)]] * B,
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, axes, joint_dim, in_channels=64):
    """``QwenImageTransformer2DModel`` arguments (patch 2; ``out_channels`` = ``in_channels / 4``: the pipeline packs
    2x2 latent patches into the input channels and the head unpacks them)."""
    return {
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": in_channels // 4,
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint_dim,
        "guidance_embeds": False,
        "axes_dims_rope": axes,
    }


NAMED_CONFIGS = (
    # Qwen/Qwen-Image transformer/config.json as published (from memory of the model card's config, not re-checked
    # offline): 60 layers, 24 heads of 128 (hidden 3072), joint_attention_dim 3584 (Qwen2.5-VL-7B's hidden size),
    # in_channels 64, out_channels 16, patch 2, axes_dims_rope (16, 56, 56), no guidance embedding. The call: the
    # model card's 1:1 size 1328x1328 (83x83 = 6889 packed tokens), an assumed 128 prompt tokens (the pipeline keeps
    # a prompt's real length, up to 512), true CFG as two calls of one sample.
    ModelConfig(
        "qwen-image",
        "qwenimage",
        transformer_kwargs(60, 24, 128, (16, 56, 56), 3584),
        "bfloat16",
        image_tokens=83 * 83,
        text_tokens=128,
        steps=50,
        description="Qwen-Image (60 dual-stream blocks, hidden 3072, ~20B) at 1328x1328, 128 text tokens",
    ),
    ModelConfig(
        "qwenimage-bench",
        "qwenimage",
        transformer_kwargs(60, 4, 64, (8, 28, 28), 256),
        image_tokens=256,
        text_tokens=64,
        description="Qwen-Image depth (60), hidden 256, 256 image + 64 text tokens (CPU benchmark)",
    ),
    ModelConfig(
        "qwenimage-tiny",
        "qwenimage",
        transformer_kwargs(3, 2, 16, (4, 6, 6), 16, in_channels=16),
        image_tokens=16,
        text_tokens=8,
        description="tests",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Qwen/Qwen-Image scheduler/scheduler_config.json (from memory, not re-checked offline): dynamic shifting over
    # 256..8192 tokens, base/max shift 0.5/0.9, exponential time shift, shift_terminal 0.02.
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import QwenImagePipeline

    if text_encoders:
        raise NotImplementedError(
            "The Qwen-Image toy pipeline has no text encoder (Qwen2.5-VL cannot be built small offline); call it "
            "with prompt_embeds (and negative_prompt_embeds for true CFG)."
        )
    return QwenImagePipeline(
        scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer
    )


def _embeds(config: ModelConfig, generator: torch.Generator, device) -> torch.Tensor:
    kw = config.transformer_kwargs
    embeds = torch.randn(config.batch, config.text_tokens, kw["joint_attention_dim"], generator=generator)
    return embeds.to(device, config.torch_dtype)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    side = _latent_side(config) * 16  # 16 px per packed latent token (VAE x8 without a VAE, 2x2 packing)
    return {
        "prompt_embeds": _embeds(config, generator, device),
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "true_cfg_scale": 1.0,  # no negative prompt: one call per step
        "output_type": "latent",  # packed latents: there is no VAE
        "generator": generator,
    }


def _toy_cfg_kwargs(config: ModelConfig, seed: int, device) -> dict:
    # True CFG: a cond and an uncond call per step, in separate cache contexts.
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)  # not the prompt's draw
    return {"negative_prompt_embeds": _embeds(config, generator, device), "true_cfg_scale": 4.0}


QWENIMAGE = register_family(
    FamilySpec(
        name="qwenimage",
        transformer_class=QwenImageTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=DUAL_STREAM_KINDS,
                units=dual_stream_units(ff="img_mlp", context_ff="txt_mlp", attn_present=_supported),
                image_output=image_output_index(QwenImageTransformerBlock),
                per_sample_args=("encoder_hidden_states_mask", "temb"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1000.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.img_in(call["hidden_states"]),  # (B, N_img, D)
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(
            correct_step=True,
            provisional_module_warmup=True,
            tied_kinds={"transformer_blocks.context_attn": "transformer_blocks.attn"},
        ),
        dicache_preset="flux",  # no official DiCache setting for Qwen-Image: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},  # the decoded images are not needed
            build_toy=_build_toy,
            call_shape=call_shape,  # packed latents as FLUX's; the text cap is the max_sequence_length
            size_rules=size_rules,
            toy_call_kwargs=_toy_call_kwargs,
            toy_cfg_kwargs=_toy_cfg_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={"image_tokens": 83 * 83, "text_tokens": 128},  # 1328x1328 px, an assumed prompt length
            named=NAMED_CONFIGS,
            bench={"cpu": "qwenimage-bench", "full": "qwen-image", "tiny": "qwenimage-tiny"},
            tiny="qwenimage-tiny",
        ),
    )
)
