"""PixArt-Sigma / PixArt-alpha (diffusers ``PixArtTransformer2DModel``): 28 ``BasicTransformerBlock`` blocks with
adaLN-single modulation.

Units (DiT's, plus the cross-attention): the self-attention ``attn1`` (kind ``attn``, before its gate), the
cross-attention to the T5 tokens ``attn2`` (kind ``cross_attn``, ungated) and the feed-forward ``ff`` (kind ``ff``,
before its gate). The timestep embedding (``adaln_single``, one table for every block), each block's scale-shift
table, the norms and the gates always run; the step cache holds the tokens entering ``norm_out``. The model predicts
noise and a learned variance (8 output channels for 4 latent ones); the pipeline keeps the first half.

``PixArtSigmaPipeline`` batches the classifier-free guidance branches in one unnamed call (negative rows first), with
the T5 padding mask per row, and passes the scheduler's integer timestep in [0, 999]. There is no official InvarDiff
or DiCache code for PixArt: calibration follows the generic official behaviour (DiT/Wan), and DiCache runs FLUX's
rules.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .calibration_spec import FamilyCalibration
from .dit import DIT
from .flux import size_rules
from .model_config import ModelConfig
from .spec import BlockListSpec, ConfigSpec, FamilySpec, PipelineSpec, ReuseUnit
from .table import register_family


def _embedded(transformer, call, dtype):
    # PixArtTransformer2DModel.forward's adaln_single embedding (B, D) in the block stack's dtype (with the resolution
    # and aspect-ratio conditions where the model takes them): the blocks' modulations are its projection (the
    # module's first output), the head's shift and scale are added to it.
    batch = call["hidden_states"].shape[0]
    _, embedded = transformer.adaln_single(
        call["timestep"], call["added_cond_kwargs"], batch_size=batch, hidden_dtype=dtype
    )
    return embedded


def _embed_timestep(transformer, call):
    return _embedded(transformer, call, call["hidden_states"].dtype)  # the patch embedding keeps the latent's dtype


def _run_head(transformer, hidden, call):
    # The output section of PixArtTransformer2DModel.forward, on the cached tokens.
    _, _, height, width = call["hidden_states"].shape
    p, channels = transformer.config.patch_size, transformer.out_channels
    embedded = _embedded(transformer, call, hidden.dtype)
    table = transformer.scale_shift_table
    shift, scale = (table[None] + embedded[:, None].to(table.device)).chunk(2, dim=1)
    hidden = transformer.norm_out(hidden)
    hidden = hidden * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
    hidden = transformer.proj_out(hidden).squeeze(1)  # (B, N, p*p*C)
    hidden = hidden.reshape(-1, height // p, width // p, p, p, channels)
    output = torch.einsum("nhwpqc->nchpwq", hidden).reshape(-1, channels, height, width)  # (B, C, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, round(fraction * 999))  # the scheduler's integer timestep in [0, 999]


def _latent_side(config: ModelConfig) -> int:
    return int(config.image_tokens**0.5) * config.transformer_kwargs["patch_size"]


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    side = _latent_side(config)
    # Prompts of different lengths: sample b's last (b % 2 + 1) quarters of text tokens are T5 padding.
    kept = config.text_tokens - (torch.arange(B, device=device) % 2 + 1) * (config.text_tokens // 4)
    mask = (torch.arange(config.text_tokens, device=device) < kept[:, None]).long()  # (B, L)
    return {
        "hidden_states": randn(B, kw["in_channels"], side, side),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["caption_channels"]),
        "encoder_attention_mask": mask,
        "timestep": torch.full((B,), round(fraction * 999), device=device, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},  # what PixArtSigmaPipeline passes
        "return_dict": False,
    }


def transformer_kwargs(heads, head_dim, sample_size, caption_channels=4096, num_layers=28, in_channels=4, **other):
    """``PixArtTransformer2DModel`` arguments of a PixArt-Sigma-like transformer (patch 2, learned variance: twice
    the latent channels out, no resolution / aspect-ratio conditioning)."""
    return {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels,
        "num_layers": num_layers,
        "cross_attention_dim": heads * head_dim,  # the caption projection maps T5 onto the model width
        "caption_channels": caption_channels,
        "sample_size": sample_size,
        "patch_size": 2,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "use_additional_conditions": False,
        **other,
    }


NAMED_CONFIGS = (
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json, as recalled (not read from the hub: no network
    # here): 28 blocks, 16 heads of 72 (hidden 1152), T5 captions of 4096, 4 latent channels in and 8 out (learned
    # variance), sample_size 128, interpolation_scale 2, no additional conditions; the rest are the diffusers
    # defaults. At 1024x1024: a 128x128 latent, 4096 tokens of 2x2 patches; the pipeline pads every prompt to 300
    # T5 tokens (max_sequence_length) and batches the CFG branches (2 rows); its default is 20 steps. float16: the
    # dtype the model card runs it in.
    ModelConfig(
        "pixart-sigma-1024",
        "pixart",
        transformer_kwargs(16, 72, 128, interpolation_scale=2),
        "float16",
        image_tokens=4096,
        text_tokens=300,
        batch=2,
        steps=20,
        description="PixArt-Sigma-XL-2-1024-MS (28 blocks, hidden 1152) at 1024x1024, 300 text tokens, batched CFG",
    ),
    ModelConfig(
        "pixart-bench",
        "pixart",
        transformer_kwargs(4, 64, 32, caption_channels=256),
        image_tokens=256,
        text_tokens=64,
        batch=2,
        steps=20,
        description="PixArt-Sigma depth (28), hidden 256, 256 image + 64 text tokens, batched CFG (CPU benchmark)",
    ),
    ModelConfig(
        "pixart-tiny-fulldepth",
        "pixart",
        transformer_kwargs(2, 8, 8, caption_channels=16),
        image_tokens=16,
        text_tokens=8,
        batch=2,
        steps=20,
        description="PixArt-Sigma depth at hidden 16 (fast CLI tests)",
    ),
    ModelConfig(
        "pixart-tiny",
        "pixart",
        transformer_kwargs(2, 8, 8, caption_channels=16, num_layers=2),
        image_tokens=16,
        text_tokens=8,
        batch=2,
        steps=20,
        description="tests",
    ),
)


def _scheduler() -> DPMSolverMultistepScheduler:
    # PixArt-Sigma's scheduler: DPM-Solver++ (2nd order) on the linear DDPM betas, epsilon prediction: the diffusers
    # defaults, which its scheduler config keeps as recalled (not read from the hub).
    return DPMSolverMultistepScheduler()


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import PixArtSigmaPipeline

    if text_encoders:
        raise NotImplementedError(
            "The PixArt toy pipeline has no text encoder (T5 with its tokenizer); call it with prompt_embeds, "
            "prompt_attention_mask and their negatives."
        )
    return PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=_scheduler()
    )


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = max(1, config.batch // 2)  # batch = samples x CFG halves
    L = config.text_tokens
    embeds = torch.randn(2, samples, L, config.transformer_kwargs["caption_channels"], generator=generator)
    lengths = torch.randint(L // 2, L + 1, (2, samples), generator=generator)  # each prompt its own T5 length
    mask = (torch.arange(L) < lengths[..., None]).long()  # (2, samples, L)
    side = _latent_side(config) * 8  # the pipeline's VAE factor without a VAE
    return {
        "prompt_embeds": embeds[0].to(device, config.torch_dtype),
        "prompt_attention_mask": mask[0].to(device),
        "negative_prompt_embeds": embeds[1].to(device, config.torch_dtype),
        "negative_prompt_attention_mask": mask[1].to(device),
        "negative_prompt": None,  # the pipeline's default "" would be encoded besides the given negative embeddings
        "height": side,
        "width": side,
        "use_resolution_binning": False,  # the toy's size is not one of the aspect-ratio bins
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 4.5,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    # The height and width as given (with use_resolution_binning the pipeline may move them to the nearest bin of
    # the same aspect ratio; the square sizes are bins themselves).
    factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    default = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    height, width = call_kwargs.get("height") or default, call_kwargs.get("width") or default
    cfg = call_kwargs.get("guidance_scale", 4.5) > 1
    text = call_kwargs.get("max_sequence_length") or 300
    return {"image_tokens": (height // factor) * (width // factor), "text_tokens": text, "batch": 2 if cfg else 1}


def _json_shape(raw: dict) -> dict:
    return {"image_tokens": (raw.get("sample_size", 128) // raw.get("patch_size", 2)) ** 2}


# DiT's units (the self-attention and the feed-forward of a BasicTransformerBlock) with the cross-attention between.
_ATTN, _FF = DIT.block_lists[0].units

PIXART = register_family(
    FamilySpec(
        name="pixart",
        transformer_class=PixArtTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=("attn", "cross_attn", "ff"),
                units=(_ATTN, ReuseUnit("cross_attn", ("cross_attn",), "attn2"), _FF),
                per_sample_args=("timestep", "encoder_hidden_states", "encoder_attention_mask"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.pos_embed(call["hidden_states"]),  # (B, N, D)
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(correct_step=True, provisional_module_warmup=True),
        dicache_preset="flux",  # no official DiCache setting for PixArt: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=size_rules,  # multiples of the VAE's 8 x the 2x2 patches
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={"text_tokens": 300, "batch": 2, "steps": 20},  # 300 T5 tokens, batched CFG, 20 steps
            json_shape=_json_shape,
            named=NAMED_CONFIGS,
            bench={"cpu": "pixart-bench", "full": "pixart-sigma-1024", "tiny": "pixart-tiny-fulldepth"},
            tiny="pixart-tiny",
        ),
    )
)
