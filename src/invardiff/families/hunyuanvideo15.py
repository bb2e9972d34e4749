"""HunyuanVideo-1.5 (diffusers ``HunyuanVideo15Transformer3DModel``): one list of 54 dual-stream blocks.

Unlike HunyuanVideo 1.0 (20 dual-stream, then 40 single-stream blocks) every block is dual-stream, with the same
units as 1.0's dual blocks: the joint attention (image and text in one call, reused only when both ``attn`` and
``context_attn`` are set), ``ff`` (image) and ``context_ff`` (text, ``ff_context``). Norms, modulation and gates
always run; the step cache holds the image tokens entering ``norm_out``. What 1.0 and 1.5 share is imported from
``hunyuanvideo.py`` (the output un-patching, the timestep convention, the calibration defaults).

The text stream of a block is three token groups, built before the blocks and always computed: the Qwen2.5-VL prompt
tokens through the token refiner, the ByT5 glyph tokens (the quoted text of a prompt) and 729 SigLIP image tokens,
zeroed and masked out for text-to-video. The forward reorders them per sample, valid tokens first, by their masks;
the block's attention mask (one row per sample) is a per-sample block argument. On the meta device (FLOP profile,
memory estimate) the forward's reads of mask values run under ``invardiff.meta_values``, so the example calls use
constant masks: all prompt tokens valid, no glyph text, text-to-video (the FLOPs do not depend on which tokens are
valid: the attention runs on every token, masked).

``HunyuanVideo15Pipeline`` runs classifier-free guidance through its guider as one transformer call per branch, in
``cache_context("pred_cond" / "pred_uncond")``: the spec names them ``"cond"`` / ``"uncond"``
(``PipelineSpec.branch_names``), one state per branch under one plan. It passes the scheduler's timestep in
[0, 1000] (no scaling) and a 65-channel input: the 32 latent channels, then 32 conditioning-latent channels and a
mask channel (zeros for text-to-video); the output has the 32 latent channels.

There is no official InvarDiff or DiCache code for HunyuanVideo-1.5. Calibration follows the generic official
behaviour (DiT/Wan) with ``context_attn`` tied to ``attn``, as for 1.0. DiCache runs FLUX's rules: the official
HunyuanVideo setting (SPEC.md B.5: delta 0.1, skip when A <= delta) was tuned on HunyuanVideo-T/2-cfgdistill, a
different network (60 blocks of hidden 3072, one call per step with embedded guidance) whose probe errors do not
transfer to 1.5's 54 blocks of hidden 2048 with true CFG. Image-to-video (``task_type="i2v"``, its own pipeline)
and the MeanFlow super-resolution models (``timestep_r``) run through the same forward and head, untested here.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15TransformerBlock

from .hunyuanvideo import HUNYUANVIDEO, _call_timestep, patch_of, size_rules, video_output
from .model_config import ModelConfig, video_call_fields, video_fields, video_latent_shape
from .spec import (
    DUAL_STREAM_KINDS,
    BlockListSpec,
    BlockOutputs,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    describe_block_outputs,
    dual_stream_units,
    image_output_index,
)
from .table import register_family


# diffusers' TransformerBlockRegistry (0.42.1) has no entry for the 1.5 block: it returns (image, text).
describe_block_outputs(HunyuanVideo15TransformerBlock, BlockOutputs(hidden_index=0, encoder_index=1))

IMAGE_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: SigLIP tokens, zeros for text-to-video
GLYPH_TOKENS = 256  # HunyuanVideo15Pipeline.tokenizer_2_max_length: ByT5 glyph tokens per prompt
PATCH = (1, 1, 1)  # patch_size_t, patch_size, patch_size of the published configs


def _embed_timestep(transformer, call):
    # HunyuanVideo15Transformer3DModel.forward's time_embed (B, D): the timestep's embedding (plus the MeanFlow
    # models' timestep_r one), in the timestep's dtype, which every block and the head modulate with.
    return transformer.time_embed(call["timestep"], timestep_r=call["timestep_r"])


def _run_head(transformer, hidden, call):
    # The output section of HunyuanVideo15Transformer3DModel.forward, on the cached image tokens.
    temb = _embed_timestep(transformer, call)
    return video_output(transformer, transformer.proj_out(transformer.norm_out(hidden, temb)), call)


def _input_signature(call):
    shapes = (call[name] for name in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_2"))
    return tuple(tuple(shape.shape) for shape in shapes)


def _glyph_tokens(config: ModelConfig) -> int:
    return config.extra.get("glyph_tokens", GLYPH_TOKENS)


def _image_tokens(config: ModelConfig) -> int:
    return config.extra.get("image_tokens", IMAGE_TOKENS)


def _latent_channels(config: ModelConfig) -> int:
    return config.transformer_kwargs["out_channels"]


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    frames, height, width = video_latent_shape(config)
    latents = randn(B, _latent_channels(config), frames, height, width)
    # Text-to-video as the pipeline calls it: zero conditioning latents and mask channel, zero image embeddings. The
    # masks are constants (every prompt token valid, no glyph text) so that the call also runs on the meta device.
    conditioning = torch.zeros(B, kw["in_channels"] - latents.shape[1], frames, height, width, device=device)
    return {
        "hidden_states": torch.cat([latents, conditioning.to(dtype)], dim=1),
        "timestep": torch.full((B,), fraction * 1000, device=device, dtype=dtype),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["text_embed_dim"]),
        "encoder_attention_mask": torch.ones(B, config.text_tokens, device=device, dtype=dtype),
        "encoder_hidden_states_2": randn(B, _glyph_tokens(config), kw["text_embed_2_dim"]),
        "encoder_attention_mask_2": torch.zeros(B, _glyph_tokens(config), device=device, dtype=dtype),
        "image_embeds": torch.zeros(B, _image_tokens(config), kw["image_embed_dim"], device=device, dtype=dtype),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, heads, head_dim, axes, text_dim, glyph_dim, image_dim, channels=32, **other):
    """``HunyuanVideo15Transformer3DModel`` arguments of a text-to-video transformer with ``channels`` latent
    channels (input: latent, conditioning latent and mask channel)."""
    return {
        "in_channels": 2 * channels + 1,
        "out_channels": channels,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": num_layers,
        "num_refiner_layers": 2,
        "mlp_ratio": 4.0,
        "patch_size": PATCH[1],
        "patch_size_t": PATCH[0],
        "qk_norm": "rms_norm",
        "text_embed_dim": text_dim,
        "text_embed_2_dim": glyph_dim,
        "image_embed_dim": image_dim,
        "rope_theta": 256.0,
        "rope_axes_dim": axes,
        "task_type": "t2v",
        "use_meanflow": False,
        **other,
    }


def _config(name, kwargs, latent, glyph_tokens=GLYPH_TOKENS, image_tokens=IMAGE_TOKENS, **fields) -> ModelConfig:
    # extra: the latent, and the glyph and image token counts of a call (the pipeline's, unless a tiny config says)
    shape = video_fields(latent, PATCH)
    shape["extra"].update(glyph_tokens=glyph_tokens, image_tokens=image_tokens)
    return ModelConfig(name, "hunyuanvideo15", kwargs, **shape, **fields)


# 1280x720, 121 frames (the pipeline's defaults at target size 960): a latent of 31 x 45 x 80 (VAE 4x temporal, 16x
# spatial), 111600 tokens of 1x1x1 patches; 1000 prompt tokens (tokenizer_max_length), 256 glyph + 729 image tokens.
_REAL_LATENT = (31, 45, 80)
_TINY = {"num_refiner_layers": 1}
NAMED_CONFIGS = (
    # The transformer config of hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v as diffusers' conversion
    # script (scripts/convert_hunyuan_video1_5_to_diffusers.py, TRANSFORMER_CONFIGS["720p_t2v"]) writes it: 54
    # blocks, 16 heads of 128 (hidden 2048), Qwen2.5-VL text 3584, ByT5 glyph 1472, SigLIP image 1152, RoPE axes
    # (16, 56, 56), 65 -> 32 channels, target_size 960. Read from that script, not from the hub's config.json.
    _config(
        "hunyuanvideo1.5-720p",
        transformer_kwargs(54, 16, 128, (16, 56, 56), 3584, 1472, 1152, target_size=960),
        _REAL_LATENT,
        text_tokens=1000,
        dtype="bfloat16",
        steps=50,
        description="HunyuanVideo-1.5 720p T2V (54 dual-stream blocks, hidden 2048) at 1280x720, 121 frames",
    ),
    # The 480p_t2v config of the same script: the same network at target_size 640 (848x480: a 31 x 30 x 53 latent).
    _config(
        "hunyuanvideo1.5-480p",
        transformer_kwargs(54, 16, 128, (16, 56, 56), 3584, 1472, 1152, target_size=640),
        (31, 30, 53),
        text_tokens=1000,
        dtype="bfloat16",
        steps=50,
        description="HunyuanVideo-1.5 480p T2V (54 dual-stream blocks, hidden 2048) at 848x480, 121 frames",
    ),
    _config(
        "hunyuanvideo15-bench",
        transformer_kwargs(54, 4, 64, (16, 24, 24), 256, 256, 256, channels=16),
        (4, 8, 8),
        glyph_tokens=16,
        image_tokens=64,
        text_tokens=64,
        steps=50,
        description="HunyuanVideo-1.5 depth (54), hidden 256, 4 latent frames of 8x8 (256 tokens), 64 prompt + 16 "
        "glyph + 64 image tokens (CPU benchmark)",
    ),
    _config(
        "hunyuanvideo15-tiny-fulldepth",
        transformer_kwargs(54, 2, 16, (4, 6, 6), 16, 16, 16, channels=4, **_TINY),
        (2, 4, 4),
        glyph_tokens=4,
        image_tokens=8,
        text_tokens=8,
        steps=50,
        description="HunyuanVideo-1.5 depth at hidden 32, 8 image tokens (fast CLI tests)",
    ),
    _config(
        "hunyuanvideo15-tiny",
        transformer_kwargs(2, 2, 16, (4, 6, 6), 16, 16, 16, channels=4, **_TINY),
        (2, 4, 4),
        glyph_tokens=4,
        image_tokens=8,
        text_tokens=8,
        steps=50,
        description="tests: 8 image tokens instead of the pipeline's 729",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=9.0)  # the 720p_t2v scheduler of the conversion script (480p: 5.0)


def _guider(guidance_scale: float = 6.0):
    from diffusers import ClassifierFreeGuidance

    return ClassifierFreeGuidance(guidance_scale=guidance_scale)  # the conversion script's guidance for T2V


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Pipeline

    if text_encoders:
        raise NotImplementedError(
            "The HunyuanVideo-1.5 toy pipeline has no text encoders (Qwen2.5-VL and ByT5 with their tokenizers); "
            "call it with prompt_embeds and prompt_embeds_2 and their masks (and their negatives)."
        )
    # The pipeline's __init__ reads the latent channels and compression factors off its VAE: a minimal random VAE
    # gives them, and is dropped (the toy returns latents, so nothing would decode with it).
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=_latent_channels(config), block_out_channels=(8,) * 5, layers_per_block=1
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=_scheduler(),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=_guider(),
    )
    pipe.register_modules(vae=None)
    # The pipeline's count of image tokens (729 SigLIP tokens) is an attribute: a tiny config may ask for fewer.
    pipe.vision_num_semantic_tokens = _image_tokens(config)
    return pipe


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    frames, height, width = video_latent_shape(config)
    B, L, G = config.batch, config.text_tokens, _glyph_tokens(config)
    embeds = torch.randn(2, B, L, kw["text_embed_dim"], generator=generator)
    glyphs = torch.randn(2, B, G, kw["text_embed_2_dim"], generator=generator)
    # Each prompt has its own length and its own count of glyph tokens: the masks differ per sample and per branch.
    masks = (torch.arange(L) < torch.randint(L // 2, L + 1, (2, B, 1), generator=generator)).to(config.torch_dtype)
    glyph_masks = (torch.arange(G) < torch.randint(0, G + 1, (2, B, 1), generator=generator)).to(config.torch_dtype)
    cast = {"device": device, "dtype": config.torch_dtype}
    branches = {}
    for index, prefix in enumerate(("", "negative_")):
        branches[f"{prefix}prompt_embeds"] = embeds[index].to(**cast)
        branches[f"{prefix}prompt_embeds_mask"] = masks[index].to(device)
        branches[f"{prefix}prompt_embeds_2"] = glyphs[index].to(**cast)
        branches[f"{prefix}prompt_embeds_mask_2"] = glyph_masks[index].to(device)
    spatial, temporal = 16, 4  # the VAE's compression (the toy's pipeline has the published factors)
    return {
        **branches,
        "height": height * spatial,
        "width": width * spatial,
        "num_frames": (frames - 1) * temporal + 1,
        "num_inference_steps": num_inference_steps,
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    # The pipeline's default size: its target size at 16:9 (HunyuanVideo15Pipeline.__call__).
    default = pipe.video_processor.calculate_default_height_width(9, 16, pipe.target_size)
    fields = video_call_fields(pipe, call_kwargs, (*default, 121), pipe.tokenizer_max_length, patch_of(pipe))
    prompt, glyphs = call_kwargs.get("prompt_embeds"), call_kwargs.get("prompt_embeds_2")
    if prompt is not None:
        fields["text_tokens"] = prompt.shape[1]
    fields["extra"]["glyph_tokens"] = glyphs.shape[1] if glyphs is not None else pipe.tokenizer_2_max_length
    return fields


HUNYUANVIDEO15 = register_family(
    FamilySpec(
        name="hunyuanvideo15",
        transformer_class=HunyuanVideo15Transformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=DUAL_STREAM_KINDS,
                units=dual_stream_units(),
                image_output=image_output_index(HunyuanVideo15TransformerBlock),
                per_sample_args=("temb", "attention_mask"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.x_embedder(call["hidden_states"]),  # (B, N_img, D)
        embed_timestep=_embed_timestep,
        calibration=HUNYUANVIDEO.calibration,  # the generic official behaviour, context_attn tied to attn
        dicache_preset="flux",  # no official DiCache setting for 1.5 (module docstring): FLUX's rules
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
            branch_names={"pred_cond": "cond", "pred_uncond": "uncond"},
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={**video_fields(_REAL_LATENT, PATCH), "text_tokens": 1000, "steps": 50},
            named=NAMED_CONFIGS,
            bench={
                "cpu": "hunyuanvideo15-bench",
                "full": "hunyuanvideo1.5-720p",
                "tiny": "hunyuanvideo15-tiny-fulldepth",
            },
            tiny="hunyuanvideo15-tiny",
        ),
    )
)
