"""Allegro (diffusers ``AllegroTransformer3DModel``): one list of ``transformer_blocks``, each self-attention,
cross-attention to the text and feed-forward, on PixArt-style single-timestep modulation.

Units (laid out like LTX-Video's, ``ltx.py``): ``self_attn`` = ``attn1`` (before its gate), ``cross_attn`` = ``attn2``
(ungated, on the un-normed tokens), ``ffn`` = ``ff`` (before its gate). Modulation, norms and gates are always
recomputed. The step cache holds the tokens entering ``norm_out``; the head is LTX-Video's (the timestep's shift and
scale on ``norm_out``, then ``proj_out``, shared through ``ltx.modulated_head``), then the unpatchify to
``(B, C, F, H, W)``.

``AllegroPipeline`` runs the classifier-free guidance branches as one batched call (negative rows first, no
``cache_context``: the ``"default"`` state) and passes the T5 embeddings as ``(B, 1, L, D)``. The 3D rotary
embedding has no batch dimension (one table for every row), so it is not cut with the samples.

There is no official InvarDiff or DiCache code for Allegro: calibration follows the generic official behaviour
(DiT/Wan), and DiCache runs FLUX's rules.
"""

from __future__ import annotations

import types

import torch
from diffusers import AllegroTransformer3DModel, EulerAncestralDiscreteScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..toy_components import tiny_t5
from .calibration_spec import FamilyCalibration
from .ltx import call_size, embedded_timestep, modulated_head, text_mask, toy_prompts
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


COMPRESSION = (4, 8)  # the Allegro VAE: 4x in time, 8x in space (the pipeline's defaults without a VAE)


def _embed_timestep(transformer, call):
    # AllegroTransformer3DModel.forward's adaln_single embedding (B, D), in the latent's dtype: the blocks'
    # modulations are its projection, the head's shift and scale are added to it.
    states = call["hidden_states"]  # (B, C, F, H, W)
    return embedded_timestep(transformer.adaln_single, call["timestep"], states.shape[0], states.dtype)


def _run_head(transformer, hidden, call):
    # The output section of AllegroTransformer3DModel.forward on the cached tokens.
    states = call["hidden_states"]  # (B, C, F, H, W)
    batch, _, frames, height, width = states.shape
    p_t, p = transformer.config.patch_size_t, transformer.config.patch_size
    embedded = _embed_timestep(transformer, call)
    table, norm, proj = transformer.scale_shift_table, transformer.norm_out, transformer.proj_out
    hidden = modulated_head(table, embedded, norm, proj, hidden).squeeze(1)  # (B, N, p_t*p*p*C)
    hidden = hidden.reshape(batch, frames // p_t, height // p, width // p, p_t, p, p, -1)
    output = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, -1, frames, height, width)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _embed_input(transformer, call):
    states = call["hidden_states"]  # (B, C, F, H, W): each frame is patch-embedded as an image
    tokens = transformer.pos_embed(states.permute(0, 2, 1, 3, 4).flatten(0, 1))
    return tokens.unflatten(0, (states.shape[0], -1)).flatten(1, 2)  # (B, N, D)


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction * 999)  # the discrete scheduler's timestep in [0, 999]


def rotary_embedding(kwargs: dict, latent: tuple[int, int, int], device):
    """The 3D rotary embedding ``AllegroPipeline`` builds for a latent ``(frames, height, width)`` of a transformer
    with arguments ``kwargs``: its own method, on the shapes it reads (no pipeline needs to exist)."""
    from diffusers import AllegroPipeline

    head_dim = kwargs["attention_head_dim"]
    if head_dim % 6:
        # diffusers rotates three equal thirds of each head (time, height, width), each by halves; another head size
        # fails deep inside get_1d_rotary_pos_embed with a bare AssertionError.
        raise ValueError(
            f"Allegro's 3D rotary embedding needs attention_head_dim to be a multiple of 6 (three equal thirds of "
            f"even width); got {head_dim}. Pick a multiple of 6 (rhymes-ai/Allegro uses 96)."
        )
    frames, height, width = latent
    _, spatial = COMPRESSION
    shapes = types.SimpleNamespace(
        vae_scale_factor_spatial=spatial, transformer=types.SimpleNamespace(config=types.SimpleNamespace(**kwargs))
    )
    return AllegroPipeline._prepare_rotary_positional_embeddings(
        shapes, 1, height * spatial, width * spatial, frames, device
    )


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    latent = video_latent_shape(config)
    return {
        "hidden_states": randn(B, kw["in_channels"], *latent),
        "encoder_hidden_states": randn(B, 1, config.text_tokens, kw["caption_channels"]),  # as the pipeline passes
        "timestep": torch.full((B,), fraction * 999, device=device),
        "encoder_attention_mask": text_mask(B, config.text_tokens, device),
        "image_rotary_emb": rotary_embedding(kw, latent, device),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, caption_channels=4096, in_channels=4, sample=(22, 90, 160)):
    """``AllegroTransformer3DModel`` arguments; the fixed ones are rhymes-ai/Allegro's transformer/config.json (patch
    1x2x2, ``gelu-approximate``, no norm affine, eps 1e-6, rotary interpolation 2.2 / 2.0 / 2.0)."""
    frames, height, width = sample
    return {
        "patch_size": 2,
        "patch_size_t": 1,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": num_layers,
        "cross_attention_dim": heads * head_dim,
        "attention_bias": True,
        "sample_height": height,
        "sample_width": width,
        "sample_frames": frames,
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "caption_channels": caption_channels,
        "interpolation_scale_t": 2.2,
        "interpolation_scale_h": 2.0,
        "interpolation_scale_w": 2.0,
    }


# AllegroPipeline's documented use: 1280x720, 88 frames -> a latent of 22 x 90 x 160 (79200 tokens of 1x2x2), 512
# T5 tokens, 100 steps, guidance 7.5 (batched CFG).
_REAL_LATENT = (22, 90, 160)
NAMED_CONFIGS = (
    # rhymes-ai/Allegro transformer/config.json: 32 layers, 24 heads of 96 (hidden 2304), cross_attention_dim 2304,
    # caption_channels 4096 (T5-XXL), 4 latent channels. From memory of the published config; it is also diffusers'
    # class default, and gives the stated 2.8B parameters.
    video_config(
        "allegro",
        "allegro",
        transformer_kwargs(32, 24, 96),
        _REAL_LATENT,
        compression=COMPRESSION,
        text_tokens=512,
        batch=2,
        dtype="bfloat16",
        steps=100,
        description="Allegro (32 blocks, hidden 2304) at 1280x720, 88 frames, 512 text tokens, batched CFG",
    ),
    video_config(
        "allegro-bench",
        "allegro",
        # 4 heads of 66, not the other benchmark configs' 64: the rotary embedding needs a multiple of 6.
        transformer_kwargs(32, 4, 66, caption_channels=256, sample=(4, 16, 16)),
        (4, 16, 16),
        compression=COMPRESSION,
        text_tokens=64,
        batch=2,
        steps=50,
        description="Allegro depth (32), hidden 264, 4 latent frames of 16x16 (256 tokens), 64 text tokens, batched "
        "CFG (CPU benchmark)",
    ),
    video_config(
        "allegro-tiny-fulldepth",
        "allegro",
        transformer_kwargs(32, 2, 12, caption_channels=16, sample=(3, 4, 4)),
        (3, 4, 4),
        compression=COMPRESSION,
        text_tokens=8,
        batch=2,
        steps=50,
        description="Allegro depth at hidden 24 (fast CLI tests)",
    ),
    video_config(
        "allegro-tiny",
        "allegro",
        transformer_kwargs(2, 2, 12, caption_channels=16, sample=(3, 4, 4)),
        (3, 4, 4),
        compression=COMPRESSION,
        text_tokens=8,
        batch=2,
        steps=50,
        description="tests",
    ),
)


def _scheduler() -> EulerAncestralDiscreteScheduler:
    # The official inference script's sampler (Euler ancestral, diffusers' default betas); the published
    # scheduler_config.json was not checked here.
    return EulerAncestralDiscreteScheduler()


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    # No VAE: the pipeline returns latents; without text encoders it runs from prompt_embeds and their masks.
    from diffusers import AllegroPipeline

    encoders = (
        tiny_t5(config.transformer_kwargs["caption_channels"])
        if text_encoders
        else {"text_encoder": None, "tokenizer": None}
    )
    return AllegroPipeline(vae=None, transformer=transformer, scheduler=_scheduler(), **encoders)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return {
        **toy_prompts(config, generator, config.transformer_kwargs["caption_channels"], device),
        "negative_prompt": None,  # the pipeline refuses its default "" beside negative_prompt_embeds
        **video_pipeline_size(config),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 7.5,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    height, width, frames = call_size(call_kwargs, (720, 1280, 88))
    temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    # AllegroPipeline.prepare_latents: an odd frame count keeps its first frame apart, an even one does not.
    latent_frames = -(-(frames - 1) // temporal) + 1 if frames % 2 else -(-frames // temporal)
    latent = (latent_frames, height // spatial, width // spatial)
    patch = pipe.transformer.config.patch_size
    cfg = call_kwargs.get("guidance_scale", 7.5) > 1
    tokens = call_kwargs.get("max_sequence_length") or 512
    fields = video_fields(latent, (pipe.transformer.config.patch_size_t, patch, patch), (temporal, spatial))
    return {**fields, "text_tokens": tokens, "batch": 2 if cfg else 1}


def _size_rules(pipe) -> dict:
    # The pipeline checks multiples of 8; the transformer's 2x2 patches need an even latent side. Any frame count
    # works: the latent rounds up and the decoded clip is cut to the count asked for.
    side = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
    rule = SizeRule(side, f"the VAE's spatial factor x the patch size ({side})")
    return {"height": rule, "width": rule, "num_frames": SizeRule(1, "any positive count")}


ALLEGRO = register_family(
    FamilySpec(
        name="allegro",
        transformer_class=AllegroTransformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=SELF_CROSS_FF_KINDS,
                units=self_cross_ff_units(),
                per_sample_args=("encoder_hidden_states", "temb", "attention_mask", "encoder_attention_mask"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=_embed_input,
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(correct_step=True, provisional_module_warmup=True),
        dicache_preset="flux",  # no official DiCache setting for Allegro: FLUX's rules
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
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={
                **video_fields(_REAL_LATENT, compression=COMPRESSION),
                "text_tokens": 512,
                "batch": 2,
                "steps": 100,
            },
            named=NAMED_CONFIGS,
            bench={"cpu": "allegro-bench", "full": "allegro", "tiny": "allegro-tiny-fulldepth"},
            tiny="allegro-tiny",
        ),
    )
)
