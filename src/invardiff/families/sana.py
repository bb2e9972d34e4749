"""Sana (diffusers ``SanaTransformer2DModel``): one list of ``transformer_blocks``, each a linear self-attention, a
cross-attention to the (Gemma) text tokens and a Mix-FFN (``GLUMBConv``: 1x1 conv, 3x3 depthwise conv, gated 1x1
conv on the token grid).

Units: ``self_attn`` = ``attn1`` (linear attention, before its gate), ``cross_attn`` = ``attn2`` (ungated: added as
is), ``ffn`` = ``ff`` (the Mix-FFN's (B, C, H, W) output, before its gate). The block's modulation, norms and gates
always run; the step cache holds the image tokens entering ``norm_out``.

``SanaPipeline`` batches the classifier-free guidance branches in one call (negative rows first) and passes the
scheduler's timestep in [0, 1000] times the transformer's ``timestep_scale`` (1.0 in the published text-to-image
configs; the spec's ``timestep_scale`` is that 1.0). There is no official InvarDiff or DiCache code for Sana:
calibration follows the generic official behaviour (DiT/Wan) and DiCache runs FLUX's rules. The toy pipeline runs
from precomputed prompt embeddings and masks (the Gemma text encoder has no tokenizer that can be built offline) and
returns latents (no VAE).
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .calibration_spec import FamilyCalibration
from .model_config import ModelConfig
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


_VAE_FACTOR = 32  # the DC-AE's spatial compression; SanaPipeline's vae_scale_factor without a VAE too


def _embed_timestep(transformer, call):
    # SanaTransformer2DModel.forward's time_embed: its second output, (B, D), is the head's conditioning, from which
    # its first (the blocks' six modulations) is computed. With `guidance` (Sana Sprint) the guidance embedding is
    # added in. hidden_dtype is the patch embedding's dtype, the latent's.
    timestep, dtype = call["timestep"], call["hidden_states"].dtype
    if call["guidance"] is not None:
        return transformer.time_embed(timestep, guidance=call["guidance"], hidden_dtype=dtype)[1]
    return transformer.time_embed(timestep, batch_size=call["hidden_states"].shape[0], hidden_dtype=dtype)[1]


def _run_head(transformer, hidden, call):
    # The output section of SanaTransformer2DModel.forward, on the cached image tokens.
    batch, _, height, width = call["hidden_states"].shape
    patch = transformer.config.patch_size
    rows, columns = height // patch, width // patch
    hidden = transformer.norm_out(hidden, _embed_timestep(transformer, call), transformer.scale_shift_table)
    hidden = transformer.proj_out(hidden)  # (B, N, p*p*C)
    hidden = hidden.reshape(batch, rows, columns, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)
    output = hidden.reshape(batch, -1, rows * patch, columns * patch)  # (B, C, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction * 1000)  # the flow-matching timestep in [0, 1000]


def _latent_side(config: ModelConfig) -> int:
    return int(config.image_tokens**0.5) * config.transformer_kwargs["patch_size"]


def _text_mask(batch: int, tokens: int, device) -> torch.Tensor:
    # The tokenizer's attention mask: the prompt's tokens, then padding (the last quarter here), int64 as tokenizers
    # return it.
    mask = torch.ones(batch, tokens, dtype=torch.long, device=device)
    mask[:, tokens - tokens // 4 :] = 0
    return mask


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    side = _latent_side(config)
    return {
        "hidden_states": randn(B, kw["in_channels"], side, side),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["caption_channels"]),
        "encoder_attention_mask": _text_mask(B, config.text_tokens, device),
        "timestep": torch.full((B,), fraction * 1000, device=device, dtype=config.torch_dtype),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, cross_heads, cross_head_dim, caption_channels=2304, head_dim=32, **other):
    """``SanaTransformer2DModel`` arguments of a Sana text-to-image transformer (patch 1, 32 latent channels, no
    positional embedding, Mix-FFN ratio 2.5); the cross-attention's width is ``cross_heads * cross_head_dim``."""
    return {
        "in_channels": 32,
        "out_channels": 32,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": num_layers,
        "num_cross_attention_heads": cross_heads,
        "cross_attention_head_dim": cross_head_dim,
        "cross_attention_dim": cross_heads * cross_head_dim,
        "caption_channels": caption_channels,
        "mlp_ratio": 2.5,
        "attention_bias": False,
        "sample_size": 32,
        "patch_size": 1,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        **other,
    }


NAMED_CONFIGS = (
    # The published transformer/config.json of Efficient-Large-Model/Sana_1600M_1024px_diffusers (20 blocks of
    # hidden 2240 = 70 heads of 32, cross-attention 20 heads of 112, Gemma-2-2B's 2304 caption channels; also
    # diffusers' class defaults) and Sana_600M_1024px_diffusers (28 blocks of 1152 = 36 x 32, cross 16 x 72), from
    # memory, not verified offline. 1024x1024 is a 32x32 latent (DC-AE 32x, patch 1): 1024 tokens; 300 text tokens
    # (max_sequence_length); batched CFG; 20 steps (the pipeline's default).
    ModelConfig(
        "sana-1600m-1024",
        "sana",
        transformer_kwargs(20, 70, 20, 112),
        "bfloat16",
        image_tokens=1024,
        text_tokens=300,
        batch=2,
        steps=20,
        description="Sana 1600M (20 blocks, hidden 2240) at 1024x1024, 300 text tokens, batched CFG",
    ),
    ModelConfig(
        "sana-600m-1024",
        "sana",
        transformer_kwargs(28, 36, 16, 72),
        "bfloat16",
        image_tokens=1024,
        text_tokens=300,
        batch=2,
        steps=20,
        description="Sana 600M (28 blocks, hidden 1152) at 1024x1024, 300 text tokens, batched CFG",
    ),
    ModelConfig(
        "sana-bench",
        "sana",
        transformer_kwargs(20, 8, 8, 32, caption_channels=256),
        image_tokens=256,
        text_tokens=64,
        batch=2,
        steps=20,
        description="Sana 1600M depth (20), hidden 256, 256 image + 64 text tokens, batched CFG (CPU benchmark)",
    ),
    ModelConfig(
        "sana-tiny",
        "sana",
        transformer_kwargs(2, 2, 2, 8, caption_channels=16, head_dim=8, in_channels=4, out_channels=4),
        image_tokens=16,
        text_tokens=8,
        batch=2,
        steps=20,
        description="tests",
    ),
)


def _scheduler() -> DPMSolverMultistepScheduler:
    # Sana's published scheduler config: DPM-Solver++ (order 2) on flow-matching sigmas with shift 3.
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import SanaPipeline

    if text_encoders:
        raise NotImplementedError(
            "The Sana toy pipeline has no text encoder (Gemma's tokenizer cannot be built offline); call it with "
            "prompt_embeds and prompt_attention_mask (and their negatives)."
        )
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=_scheduler())


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = max(1, config.batch // 2)  # batch = samples x CFG halves
    channels = config.transformer_kwargs["caption_channels"]
    embeds = torch.randn(2, samples, config.text_tokens, channels, generator=generator)
    mask = _text_mask(samples, config.text_tokens, device)
    side = _latent_side(config) * _VAE_FACTOR
    return {
        "prompt_embeds": embeds[0].to(device, config.torch_dtype),
        "prompt_attention_mask": mask,
        "negative_prompt": None,  # its default "" would be encoded, and cannot come with the embeddings
        "negative_prompt_embeds": embeds[1].to(device, config.torch_dtype),
        "negative_prompt_attention_mask": mask.clone(),
        "height": side,
        "width": side,
        "use_resolution_binning": False,  # the toy sizes are in no aspect-ratio bin
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 4.5,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _factor(pipe) -> int:
    return pipe.vae_scale_factor * pipe.transformer.config.patch_size


def _call_shape(pipe, call_kwargs: dict) -> dict:
    factor = _factor(pipe)
    default = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    height, width = call_kwargs.get("height") or default, call_kwargs.get("width") or default
    cfg = call_kwargs.get("guidance_scale", 4.5) > 1
    text = call_kwargs.get("max_sequence_length") or 300
    return {"image_tokens": (height // factor) * (width // factor), "text_tokens": text, "batch": 2 if cfg else 1}


def _size_rules(pipe) -> dict:
    why = f"the VAE's factor {pipe.vae_scale_factor} x the patch size {pipe.transformer.config.patch_size}"
    return {"height": SizeRule(_factor(pipe), why), "width": SizeRule(_factor(pipe), why)}


SANA = register_family(
    FamilySpec(
        name="sana",
        transformer_class=SanaTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=SELF_CROSS_FF_KINDS,
                units=self_cross_ff_units(),
                # The blocks' modulation (`timestep`: (B, 6D)), the text and its mask are per sample.
                per_sample_args=("attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.patch_embed(call["hidden_states"]),  # (B, N, D)
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(correct_step=True, provisional_module_warmup=True),
        dicache_preset="flux",  # no official DiCache setting for Sana: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=_size_rules,
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={"image_tokens": 1024, "text_tokens": 300, "batch": 2, "steps": 20},
            named=NAMED_CONFIGS,
            bench={"cpu": "sana-bench", "full": "sana-1600m-1024", "tiny": "sana-tiny"},
            tiny="sana-tiny",
        ),
    )
)
