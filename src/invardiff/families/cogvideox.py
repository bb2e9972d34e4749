"""CogVideoX and CogVideoX1.5 (diffusers ``CogVideoXTransformer3DModel``): one list of ``transformer_blocks`` over
text and video tokens together.

Each block is an "expert" transformer block: ``norm1`` and ``norm2`` (``CogVideoXLayerNormZero``) normalise and
modulate the text and video tokens with separate scales, shifts and gates; one joint attention ``attn1`` runs over the
concatenated tokens and returns ``(video, text)``; one feed-forward ``ff`` runs once over the concatenated
``[text; video]`` tokens. Units: the joint attention (kinds ``attn`` and ``context_attn``, reused together, as
CogView4's: :func:`~invardiff.families.spec.joint_attention_unit`) and ``ff``, whose one call serves both streams (so
there is no separate text feed-forward kind). Norms, modulation and gates always run; the step cache holds the video
tokens entering ``norm_final`` (then ``norm_out`` and ``proj_out``; the text stream after the last block is dropped).

CogVideoX-2b adds sin-cos positional embeddings to the tokens (``use_rotary_positional_embeddings=False``); 5b and
1.5 take 3D rotary embeddings, which ``CogVideoXPipeline`` computes and passes as ``image_rotary_emb`` (shared by the
rows of a call). CogVideoX1.5 cuts the latent into 2-frame patches (``patch_size_t=2``); its pipeline pads the latent
to an even number of frames (and drops the padding after denoising), so a 1.5 call carries the padded latent.
Latents are ``(B, F, C, H, W)`` (frames before channels, unlike Wan's).

``CogVideoXPipeline`` batches the classifier-free guidance branches in one call (negative rows first) inside
``cache_context("cond_uncond")``: one state whose rows each decide alone under a probe policy. It passes the
scheduler's integer DDIM-style timestep in [0, 999]. There is no official InvarDiff or DiCache code for CogVideoX:
calibration follows the generic official behaviour (DiT/Wan) with ``context_attn`` tied to ``attn`` (CogView4's),
and DiCache runs FLUX's rules. Image-to-video models (``CogVideoXImageToVideoPipeline``: 32 input channels, the
``ofs`` embedding of 1.5) share the transformer class; the head handles ``ofs``, but no config or toy covers them.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from .cogview4 import JOINT_CALIBRATION
from .flux import input_signature
from .model_config import (
    ModelConfig,
    video_call_fields,
    video_fields,
    video_latent_shape,
    video_pipeline_size,
    video_size_rules,
)
from .spec import (
    BlockListSpec,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    ReuseUnit,
    image_output_index,
    joint_attention_unit,
)
from .table import register_family


def _time_embedding(transformer, call):
    # The conditioning of CogVideoXTransformer3DModel.forward: timestep (+ 1.5 I2V's ofs) embeddings, in the latent's
    # dtype.
    dtype = call["hidden_states"].dtype
    emb = transformer.time_embedding(transformer.time_proj(call["timestep"]).to(dtype=dtype), call["timestep_cond"])
    if transformer.ofs_embedding is not None:
        emb = emb + transformer.ofs_embedding(transformer.ofs_proj(call["ofs"]).to(dtype=dtype))
    return emb


def _run_head(transformer, hidden, call):
    # The output section of CogVideoXTransformer3DModel.forward, on the cached video tokens.
    batch, frames, _, height, width = call["hidden_states"].shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    hidden = transformer.norm_out(transformer.norm_final(hidden), temb=_time_embedding(transformer, call))
    hidden = transformer.proj_out(hidden)  # (B, N, p_t*p*p*C)
    if p_t is None:
        output = hidden.reshape(batch, frames, height // p, width // p, -1, p, p)
        output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
    else:
        output = hidden.reshape(batch, (frames + p_t - 1) // p_t, height // p, width // p, -1, p_t, p, p)
        output = output.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)  # (B, F, C, H, W)


def _embed_input(transformer, call):
    # The video tokens entering the first block (patch embedding, and 2b's positional embedding).
    tokens = transformer.patch_embed(call["encoder_hidden_states"], call["hidden_states"])
    return tokens[:, call["encoder_hidden_states"].shape[1] :]  # (B, N, D)


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, round(fraction * 999))  # the scheduler's integer timestep in [0, 999]


def _rotary_embedding(config: ModelConfig, frames: int, height: int, width: int, device):
    # CogVideoXPipeline's own computation (its method, on a stand-in with the fields it reads), for a latent of
    # `frames` x `height` x `width`; None where the model takes no rotary embedding (2b).
    kw = config.transformer_kwargs
    if not kw.get("use_rotary_positional_embeddings", False):
        return None
    from diffusers import CogVideoXPipeline

    fields = {"patch_size": 2, "patch_size_t": None, "sample_height": 60, "sample_width": 90, "attention_head_dim": 64}
    transformer = SimpleNamespace(config=SimpleNamespace(**{k: kw.get(k, v) for k, v in fields.items()}))
    stand_in = SimpleNamespace(vae_scale_factor_spatial=8, transformer=transformer)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(stand_in, height * 8, width * 8, frames, device)


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    frames, height, width = video_latent_shape(config)
    return {
        "hidden_states": randn(B, frames, kw["in_channels"], height, width),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["text_embed_dim"]),
        "timestep": torch.full((B,), round(fraction * 999), device=device, dtype=torch.long),
        "image_rotary_emb": _rotary_embedding(config, frames, height, width, device),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim=64, text_dim=4096, time_dim=512, in_channels=16, **other):
    """``CogVideoXTransformer3DModel`` arguments of a CogVideoX-5b-like text-to-video transformer (patch 2, rotary
    embeddings, the published sample size 60 x 90 x 49 and 226 text tokens unless ``other`` says otherwise)."""
    return {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "time_embed_dim": time_dim,
        "text_embed_dim": text_dim,
        "num_layers": num_layers,
        "sample_width": 90,
        "sample_height": 60,
        "sample_frames": 49,
        "patch_size": 2,
        "max_text_seq_length": 226,
        "use_rotary_positional_embeddings": True,
        **other,
    }


def _config(name, kwargs, latent, patch=(1, 2, 2), **fields):
    return ModelConfig(name, "cogvideox", kwargs, **video_fields(latent, patch), batch=2, steps=50, **fields)


# 720x480, 49 frames (CogVideoX-5b's only resolution): a latent of 13 x 60 x 90 (VAE 4x temporal, 8x spatial),
# 13 x 30 x 45 = 17550 tokens of 2x2 patches. CogVideoX1.5 at its default 1360x768, 81 frames: a latent of 21 frames,
# padded to 22, of 96 x 170: 11 x 48 x 85 = 44880 tokens of 2x2x2 patches.
_REAL_LATENT = (13, 60, 90)
_REAL_LATENT_1_5 = (22, 96, 170)


def _json_shape(raw: dict) -> dict:
    # A config.json with 2-frame patches is a CogVideoX1.5 model: its default video, else 5b's.
    p_t, p = raw.get("patch_size_t"), raw.get("patch_size", 2)
    return video_fields(_REAL_LATENT_1_5 if p_t else _REAL_LATENT, (p_t or 1, p, p))


NAMED_CONFIGS = (
    # THUDM/CogVideoX-5b transformer/config.json: 42 layers, 48 heads of 64 (hidden 3072), T5 embeddings of 4096,
    # time embedding 512, patch 2, 16 latent channels, sample 60 x 90 x 49, 226 text tokens, rotary embeddings; the
    # other fields are the diffusers defaults (attention bias, gelu-approximate, LayerNorm eps 1e-5). From the model
    # card and public copies of the config; not read from the hub (no network here). The pipeline pads every prompt
    # to 226 T5 tokens and batches the CFG branches: 2 rows per call.
    _config(
        "cogvideox-5b",
        transformer_kwargs(42, 48),
        _REAL_LATENT,
        text_tokens=226,
        dtype="bfloat16",
        description="CogVideoX-5b (42 blocks, hidden 3072) at 720x480, 49 frames, 226 text tokens, batched CFG",
    ),
    # THUDM/CogVideoX1.5-5B transformer/config.json: as 5b, with 2-frame patches (patch_size_t 2), no patch-embedding
    # bias, sample 300 x 300 x 81 (the rotary grid's maximum size). From several public copies of the config, which
    # agree; not read from the hub. At its default 1360x768, 81 frames (_REAL_LATENT_1_5).
    _config(
        "cogvideox1.5-5b",
        transformer_kwargs(
            42, 48, sample_width=300, sample_height=300, sample_frames=81, patch_size_t=2, patch_bias=False
        ),
        _REAL_LATENT_1_5,
        patch=(2, 2, 2),
        text_tokens=226,
        dtype="bfloat16",
        description="CogVideoX1.5-5B (42 blocks, hidden 3072, 2-frame patches) at 1360x768, 81 frames, batched CFG",
    ),
    _config(
        "cogvideox-bench",
        transformer_kwargs(42, 4, text_dim=256),
        (4, 16, 16),
        text_tokens=64,
        description="CogVideoX-5b depth (42), hidden 256, 4 latent frames of 16x16 (256 tokens), 64 text tokens, "
        "batched CFG (CPU benchmark)",
    ),
    _config(
        "cogvideox-tiny-fulldepth",
        transformer_kwargs(42, 2, head_dim=16, text_dim=16, time_dim=16, in_channels=4),
        (2, 8, 8),
        text_tokens=8,
        description="CogVideoX-5b depth at hidden 32 (fast CLI tests)",
    ),
    _config(
        "cogvideox-tiny",
        transformer_kwargs(2, 2, head_dim=16, text_dim=16, time_dim=16, in_channels=4),
        (2, 8, 8),
        text_tokens=8,
        description="tests",
    ),
)


def _scheduler() -> CogVideoXDDIMScheduler:
    # THUDM/CogVideoX-5b's scheduler config, as recalled (not read from the hub): v-prediction on a zero-terminal-SNR
    # scaled-linear schedule, trailing timesteps. The model card suggests CogVideoXDPMScheduler for 5b; DDIM keeps the
    # toy's step simple, and both take the same timesteps.
    return CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import CogVideoXPipeline

    if text_encoders:
        raise NotImplementedError(
            "The CogVideoX toy pipeline has no text encoder (T5 with its tokenizer); call it with prompt_embeds and "
            "negative_prompt_embeds."
        )
    return CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=_scheduler()
    )


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = max(1, config.batch // 2)  # batch = samples x CFG halves
    text_dim = config.transformer_kwargs["text_embed_dim"]
    embeds = torch.randn(2, samples, config.text_tokens, text_dim, generator=generator)
    return {
        "prompt_embeds": embeds[0].to(device, config.torch_dtype),
        "negative_prompt_embeds": embeds[1].to(device, config.torch_dtype),
        **video_pipeline_size(config),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 6.0,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _patch(pipe) -> tuple[int, int, int]:
    config = pipe.transformer.config
    return (config.patch_size_t or 1, config.patch_size, config.patch_size)


def _call_shape(pipe, call_kwargs: dict) -> dict:
    # The pipeline's defaults: the transformer's sample size (latent sides x the VAE's 8) and frames; 226 T5 tokens.
    config = pipe.transformer.config
    default = (config.sample_height * 8, config.sample_width * 8, config.sample_frames)
    fields = video_call_fields(pipe, call_kwargs, default, 226, _patch(pipe))
    frames, height, width = fields["extra"]["latent"]
    frames += -frames % _patch(pipe)[0]  # CogVideoX1.5's pipeline pads the latent to whole 2-frame patches
    cfg = call_kwargs.get("guidance_scale", 6.0) > 1
    return {**fields, **video_fields((frames, height, width), _patch(pipe)), "batch": 2 if cfg else 1}


def _size_rules(pipe) -> dict:
    return video_size_rules(pipe, _patch(pipe))


COGVIDEOX = register_family(
    FamilySpec(
        name="cogvideox",
        transformer_class=CogVideoXTransformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=("attn", "context_attn", "ff"),
                units=(joint_attention_unit("attn1"), ReuseUnit("ff", ("ff",), "ff")),
                image_output=image_output_index(CogVideoXBlock),
                per_sample_args=("temb",),  # the rotary embedding has one row for the whole batch
            ),
        ),
        head_input="norm_final",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=input_signature,
        embed_input=_embed_input,
        embed_timestep=_time_embedding,  # (B, D): every block's and the head's modulation come from it
        calibration=JOINT_CALIBRATION,
        dicache_preset="flux",  # no official DiCache setting for CogVideoX: FLUX's rules
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
            # A config.json says nothing of the call: the default video (_json_shape), 226 text tokens, batched CFG.
            json_defaults={"text_tokens": 226, "batch": 2, "steps": 50},
            json_shape=_json_shape,
            named=NAMED_CONFIGS,
            bench={"cpu": "cogvideox-bench", "full": "cogvideox-5b", "tiny": "cogvideox-tiny-fulldepth"},
            tiny="cogvideox-tiny",
        ),
    )
)
