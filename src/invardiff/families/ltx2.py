"""LTX-2 (diffusers ``LTX2VideoTransformer3DModel``): one list of ``transformer_blocks``, each carrying two token
streams, video and audio, and returning both; the head normalises and projects each (``norm_out`` / ``proj_out``,
``audio_norm_out`` / ``audio_proj_out``) and the transformer returns both outputs.

Units, in the block's forward order, each the module's output before its gate: ``self_attn`` = ``attn1`` (video
self-attention), ``audio_self_attn`` = ``audio_attn1``, ``cross_attn`` = ``attn2`` (video to text),
``audio_cross_attn`` = ``audio_attn2`` (audio to text), ``a2v_attn`` = ``audio_to_video_attn`` (queries video, keys
and values audio), ``v2a_attn`` = ``video_to_audio_attn`` (queries audio, keys and values video), ``ffn`` = ``ff`` and
``audio_ffn`` = ``audio_ff``. The norms, modulations and gates are always recomputed from the current timestep.

The pre-head state is both streams (``FamilySpec.head_streams``): the engine packs the last block's video tokens
(B, N_v, D_v) and audio tokens (B, N_a, D_a) into one (B, N_v * D_v + N_a * D_a) tensor, video first, which every
policy sees as the one pre-head state H; ``run_head`` unpacks it and runs both heads as ``forward`` does. The
block-stack input x (``embed_input``) is both patch projections packed the same way, so the residual H - x of
residual step reuse and of DiCache pairs each stream with its own input. DiCache's probe measures the relative L1
change of the packed probe output (both streams of the probe block, summed over both) and extrapolates the packed
residual: a natural generalisation of the single-stream rule, not in any official code (there is no official
InvarDiff or DiCache code for LTX-2). Calibration follows the generic official behaviour (DiT/Wan: corrected step
stream, forced module warm-up) and DiCache runs FLUX's rules.

Calls. ``LTX2Pipeline`` runs the classifier-free guidance branches as one batched call in
``transformer.cache_context("cond_uncond")`` (per-sample probe decisions), and, when enabled, a spatio-temporal
guidance call (``"uncond_stg"``: self-attention of the given blocks perturbed) and a modality-isolation call
(``"uncond_modality"``: no audio-video cross-attention) per step: each context name is its own branch with its own
caches, so each call reuses only what a call of its own kind computed (an isolated call runs no ``a2v_attn`` /
``v2a_attn``: their plan bits have nothing to act on there, and the FLOP profile, made on the full call, overstates
that call's work). Every per-sample block argument (text, modulations,
rotary embeddings, masks, the STG perturbation mask) is cut with the samples. A call that gives ``audio_timestep``
different from ``timestep`` is supported (the audio head reads it), but only ``timestep`` is checked against the
schedule.

Toy pipeline. The stock ``LTX2Pipeline`` runs offline around a random-weight transformer with tiny random
components: the video VAE (at LTX-2's 8x / 32x compression), the audio VAE, the text connectors and the vocoder,
and, for ``pipe(prompt=...)``, a tiny Gemma 3 text stack with a tokenizer built in code
(:func:`~invardiff.toy_components.tiny_gemma3`). The conformance kit calls it from ``prompt_embeds`` with CFG alone
(one batched call per step); ``tests/test_family_ltx2.py`` runs its default three calls per step. The sampler is
LTX-Video's (``ltx.scheduler``: the same settings are assumed for LTX-2, not checked against its hub config).
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import AudioVisualModelOutput, LTX2VideoTransformerBlock

from ..seeding import seeded
from ..toy_components import tiny_gemma3
from .calibration_spec import FamilyCalibration
from .ltx import LTX, call_timestep, embedded_timestep, modulated_head, scheduler, text_mask, toy_prompts
from .ltx import call_shape as ltx_call_shape
from .model_config import ModelConfig, video_fields, video_latent_shape, video_pipeline_size
from .spec import (
    BlockListSpec,
    BlockOutputs,
    ConfigSpec,
    FamilySpec,
    HeadStreams,
    ReuseUnit,
    describe_block_outputs,
)
from .table import register_family


# The block returns (video, audio); diffusers' block registry does not describe it. A skipped block hands both on.
describe_block_outputs(
    LTX2VideoTransformerBlock,
    BlockOutputs(hidden_index=0, encoder_index=1, hidden_arg="hidden_states", encoder_arg="audio_hidden_states"),
)

HEAD_STREAMS = HeadStreams(
    outputs=(0, 1),
    arguments=("hidden_states", "audio_hidden_states"),
    modules=("norm_out", "audio_norm_out"),
    latents=("hidden_states", "audio_hidden_states"),
)

# (unit name, module path), in the block's forward order; each unit has a plan kind of its own name.
_UNITS = (
    ("self_attn", "attn1"),
    ("audio_self_attn", "audio_attn1"),
    ("cross_attn", "attn2"),
    ("audio_cross_attn", "audio_attn2"),
    ("a2v_attn", "audio_to_video_attn"),
    ("v2a_attn", "video_to_audio_attn"),
    ("ffn", "ff"),
    ("audio_ffn", "audio_ff"),
)
KINDS = tuple(name for name, _ in _UNITS)

# The block arguments with one row per sample besides the two streams (None ones are passed through as they are).
PER_SAMPLE_ARGS = (
    "encoder_hidden_states",
    "audio_encoder_hidden_states",
    "temb",
    "temb_audio",
    "temb_ca_scale_shift",
    "temb_ca_audio_scale_shift",
    "temb_ca_gate",
    "temb_ca_audio_gate",
    "temb_prompt",
    "temb_prompt_audio",
    "video_rotary_emb",
    "audio_rotary_emb",
    "ca_video_rotary_emb",
    "ca_audio_rotary_emb",
    "encoder_attention_mask",
    "audio_encoder_attention_mask",
    "self_attention_mask",
    "perturbation_mask",
)

COMPRESSION = (8, 32)  # the LTX-2 video VAE: 8x in time, 32x in space
FRAME_RATE = 24.0  # LTX2Pipeline's default frame_rate
AUDIO_LATENTS_PER_SECOND = 25  # 16 kHz, hop 160, the audio VAE's 4x temporal compression (LTX2Pipeline)


def _stream_shapes(transformer, call) -> tuple[tuple[int, int], tuple[int, int]]:
    # The (tokens, width) of each stream in the blocks: the patch projections keep the token counts.
    video, audio = call["hidden_states"], call["audio_hidden_states"]
    return (video.shape[1], transformer.proj_in.out_features), (audio.shape[1], transformer.audio_proj_in.out_features)


def _audio_timestep(call):
    return call["audio_timestep"] if call["audio_timestep"] is not None else call["timestep"]


def _run_head(transformer, hidden, call):
    # The output section of LTX2VideoTransformer3DModel.forward on the packed pre-head state: each stream's head.
    video, audio = HEAD_STREAMS.unpack(hidden, _stream_shapes(transformer, call))
    batch = call["hidden_states"].size(0)
    embedded = embedded_timestep(transformer.time_embed, call["timestep"], batch, video.dtype)
    output = modulated_head(transformer.scale_shift_table, embedded, transformer.norm_out, transformer.proj_out, video)
    audio_embedded = embedded_timestep(transformer.audio_time_embed, _audio_timestep(call), batch, audio.dtype)
    table, norm, proj = transformer.audio_scale_shift_table, transformer.audio_norm_out, transformer.audio_proj_out
    audio_output = modulated_head(table, audio_embedded, norm, proj, audio)
    if call["return_dict"]:
        return AudioVisualModelOutput(sample=output, audio_sample=audio_output)
    return output, audio_output


def _embed_input(transformer, call):
    # Both patch projections, packed as the pre-head state is (the first block's two stream arguments).
    video = transformer.proj_in(call["hidden_states"])
    keyframes = call["video_keyframes_mask"]
    if transformer.config.use_keyframes_abs_pos_embedding and keyframes is not None:
        marker = (keyframes > 0).to(dtype=video.dtype)
        video = video + marker * transformer.keyframes_abs_pos_embedding.to(dtype=video.dtype)
    return HEAD_STREAMS.pack([video, transformer.audio_proj_in(call["audio_hidden_states"])])


def _embed_timestep(transformer, call):
    # The video stream's embedded timestep (the audio stream's comes from audio_time_embed the same way).
    states = call["hidden_states"]
    return embedded_timestep(transformer.time_embed, call["timestep"], states.size(0), states.dtype)


def _input_signature(call):
    names = ("hidden_states", "audio_hidden_states", "encoder_hidden_states", "audio_encoder_hidden_states")
    return tuple(tuple(call[name].shape) for name in names)


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B = config.transformer_kwargs, config.batch
    frames, height, width = video_latent_shape(config)
    audio_tokens = config.extra["audio_tokens"]
    mask = text_mask(B, config.text_tokens, device)
    return {
        "hidden_states": randn(B, frames * height * width, kw["in_channels"]),  # packed, patch 1x1x1
        "audio_hidden_states": randn(B, audio_tokens, kw["audio_in_channels"]),  # packed (channels x mel bins)
        # The text connectors' outputs: one sequence per stream, each projected by the transformer's captions.
        "encoder_hidden_states": randn(B, config.text_tokens, kw["caption_channels"]),
        "audio_encoder_hidden_states": randn(B, config.text_tokens, kw["caption_channels"]),
        "timestep": torch.full((B,), fraction * 1000, device=device),  # the scheduler's float32 timestep
        "encoder_attention_mask": mask,
        "audio_encoder_attention_mask": mask,
        "num_frames": frames,
        "height": height,
        "width": width,
        "fps": FRAME_RATE,
        "audio_num_frames": audio_tokens,
        # LTX2Pipeline passes sigma=timestep with use_cross_timestep=True: with no audio_timestep of its own, that
        # computes what the legacy use_cross_timestep=False does from the timestep alone, which a loop that only
        # advances the timestep keeps right.
        "use_cross_timestep": False,
        "return_dict": False,
    }


def transformer_kwargs(
    num_layers,
    heads,
    head_dim,
    audio_heads,
    audio_head_dim,
    caption_channels=3840,
    in_channels=128,
    audio_in_channels=128,
):
    """``LTX2VideoTransformer3DModel`` arguments: the video stream's ``heads`` x ``head_dim`` (its text
    cross-attention as wide), the audio stream's ``audio_heads`` x ``audio_head_dim`` (its text and cross-modal
    attention as wide); the rest at diffusers' defaults (LTX-2.0: no gated attention, no prompt modulation)."""
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "patch_size": 1,
        "patch_size_t": 1,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "cross_attention_dim": heads * head_dim,
        "audio_in_channels": audio_in_channels,
        "audio_out_channels": audio_in_channels,
        "audio_num_attention_heads": audio_heads,
        "audio_attention_head_dim": audio_head_dim,
        "audio_cross_attention_dim": audio_heads * audio_head_dim,
        "num_layers": num_layers,
        "caption_channels": caption_channels,
    }


def _fields(latent: tuple[int, int, int], audio_tokens: int) -> dict:
    fields = video_fields(latent, (1, 1, 1), COMPRESSION)
    return {**fields, "extra": {**fields["extra"], "audio_tokens": audio_tokens}}


# LTX2Pipeline at 768x512, 121 frames (24 fps: 5.04 s): a latent of 16 x 16 x 24 (6144 video tokens) and
# round(5.04 * 25) = 126 audio tokens; 1024 text tokens (its max_sequence_length); batched CFG: 2 rows per call.
_REAL_LATENT, _REAL_AUDIO = (16, 16, 24), 126
NAMED_CONFIGS = (
    # Lightricks/LTX-2 transformer/config.json (the 19B audio-video model): 48 layers; video 32 heads of 128 (4096),
    # audio 32 heads of 64 (2048); caption_channels 3840 (Gemma 3 12B); 128 video and 128 audio latent channels.
    # Written from memory and NOT verified against the hub file; diffusers' LTX2VideoTransformer3DModel defaults,
    # which were written from that config, are the same.
    ModelConfig(
        "ltx2-19b",
        "ltx2",
        transformer_kwargs(48, 32, 128, 32, 64),
        **_fields(_REAL_LATENT, _REAL_AUDIO),
        text_tokens=1024,
        batch=2,
        dtype="bfloat16",
        steps=30,
        description="LTX-2 19B (48 blocks, video 4096, audio 2048) at 768x512, 121 frames with audio, 1024 text "
        "tokens, batched CFG (config from memory, unverified)",
    ),
    ModelConfig(
        "ltx2-bench",
        "ltx2",
        transformer_kwargs(48, 4, 64, 4, 32, caption_channels=256),
        **_fields((4, 8, 8), 32),
        text_tokens=64,
        batch=2,
        steps=30,
        description="LTX-2 depth (48), video 256 / audio 128 wide, 4 latent frames of 8x8 (256 tokens), 32 audio "
        "tokens, 64 text tokens, batched CFG (CPU benchmark)",
    ),
    ModelConfig(
        "ltx2-tiny",
        "ltx2",
        transformer_kwargs(2, 2, 8, 2, 4, caption_channels=16, in_channels=8, audio_in_channels=8),
        **_fields((2, 2, 2), 5),
        text_tokens=8,
        batch=2,
        steps=30,
        description="tests",
    ),
)


# ----- the stock LTX2Pipeline around a random-weight transformer (no downloads) ----------------------------------
TEXT_LAYERS = 2  # the toy Gemma 3's decoder layers: the pipeline stacks its TEXT_LAYERS + 1 hidden states


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    # Every component tiny and random, at the shapes the transformer needs: the video VAE at LTX-2's compression
    # (8x in time, 32x in space, set on the VAE rather than built from 5 downsampling blocks), the audio VAE with
    # 2 latent channels x mel_bins / 4 latent bins = the transformer's audio_in_channels, connectors of the caption
    # width. With output_type="latent" (the toy calls') the VAEs give only their latent statistics and the vocoder
    # does not run; a decoding call runs them all.
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2Pipeline
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    kw = config.transformer_kwargs
    width, audio_channels = kw["caption_channels"], kw["audio_in_channels"]
    mel_bins = 2 * audio_channels
    temporal, spatial = COMPRESSION
    with seeded(0):
        vae = AutoencoderKLLTX2Video(
            latent_channels=kw["in_channels"],
            block_out_channels=(8,),
            down_block_types=("LTX2VideoDownBlock3D",),
            decoder_block_out_channels=(8,),
            layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            spatio_temporal_scaling=(True,),
            decoder_spatio_temporal_scaling=(True,),
            decoder_inject_noise=(False, False),
            downsample_type=("spatiotemporal",),
            upsample_type=("spatiotemporal",),
            upsample_residual=(True,),
            upsample_factor=(2,),
            spatial_compression_ratio=spatial,
            temporal_compression_ratio=temporal,
        )
        audio_vae = AutoencoderKLLTX2Audio(
            base_channels=audio_channels,  # also the size of its latent statistics: the packed audio channels
            ch_mult=(1,),
            num_res_blocks=1,
            latent_channels=2,
            mel_bins=mel_bins,
        )
        heads = {"num_attention_heads": 2, "attention_head_dim": width // 2, "num_layers": 1}
        connectors = LTX2TextConnectors(
            caption_channels=width,
            text_proj_in_factor=TEXT_LAYERS + 1,
            **{f"video_connector_{key}": value for key, value in heads.items()},
            **{f"audio_connector_{key}": value for key, value in heads.items()},
            video_connector_num_learnable_registers=8,  # the real model's padding registers (128 there)
            audio_connector_num_learnable_registers=8,
        )
        vocoder = LTX2Vocoder(
            in_channels=2 * mel_bins,  # the audio VAE's 2 output channels x mel_bins
            hidden_channels=8,
            upsample_kernel_sizes=[4],
            upsample_factors=[2],
            resnet_kernel_sizes=[3],
            resnet_dilations=[[1]],
        )
    encoders = tiny_gemma3(width, TEXT_LAYERS) if text_encoders else {"text_encoder": None, "tokenizer": None}
    parts = {"vae": vae, "audio_vae": audio_vae, "connectors": connectors, "vocoder": vocoder}
    parts = {name: part.eval().requires_grad_(False).to(config.torch_dtype) for name, part in parts.items()}
    return LTX2Pipeline(scheduler=scheduler(), transformer=transformer, **parts, **encoders)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # The Gemma hidden states the connectors take: TEXT_LAYERS + 1 of them, stacked per token; Gemma pads left.
    prompts = toy_prompts(config, generator, config.transformer_kwargs["caption_channels"] * (TEXT_LAYERS + 1), device)
    for key in ("prompt_attention_mask", "negative_prompt_attention_mask"):
        prompts[key] = prompts[key].flip(-1)
    size = video_pipeline_size(config)
    return {
        **prompts,
        **size,
        # The pipeline draws round(num_frames / frame_rate * 25) audio latents: this rate gives the config's count.
        "frame_rate": size["num_frames"] * AUDIO_LATENTS_PER_SECOND / config.extra["audio_tokens"],
        "num_inference_steps": num_inference_steps,
        "max_sequence_length": config.text_tokens,
        "guidance_scale": 3.0,  # batched CFG: one call of 2 x samples rows per step
        # The spatio-temporal and modality-isolation guidance calls off: one call per step, as the kit's checks
        # count (tests/test_family_ltx2.py runs the pipeline's default three calls).
        "stg_scale": 0.0,
        "audio_stg_scale": 0.0,
        "modality_scale": 1.0,
        "audio_modality_scale": 1.0,
        "output_type": "latent",
        "generator": generator,
    }


def call_shape(pipe, call_kwargs: dict) -> dict:
    """:class:`ModelConfig` call-shape fields of one sample of the ``LTX2Pipeline`` call ``pipe(**call_kwargs)``:
    LTX-Video's rules at LTX2Pipeline's defaults (768x512, 121 frames, 1024 Gemma tokens), plus the audio latents
    the pipeline draws for the clip's duration."""
    fields = ltx_call_shape(pipe, call_kwargs, default_size=(512, 768, 121), text_tokens=1024)
    frames = call_kwargs.get("num_frames") or 121
    seconds = frames / (call_kwargs.get("frame_rate") or FRAME_RATE)
    rate = pipe.audio_sampling_rate / pipe.audio_hop_length / float(pipe.audio_vae_temporal_compression_ratio)
    return {**fields, "extra": {**fields["extra"], "audio_tokens": round(seconds * rate)}}


LTX2 = register_family(
    FamilySpec(
        name="ltx2",
        transformer_class=LTX2VideoTransformer3DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=KINDS,
                units=tuple(ReuseUnit(name, (name,), module) for name, module in _UNITS),
                image_output=0,
                per_sample_args=PER_SAMPLE_ARGS,
            ),
        ),
        head_input="norm_out",
        head_streams=HEAD_STREAMS,
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=_embed_input,
        embed_timestep=_embed_timestep,
        # No official code: the generic official behaviour (DiT/Wan), every branch of the batched call recorded.
        calibration=FamilyCalibration(correct_step=True, provisional_module_warmup=True),
        dicache_preset="flux",  # no official DiCache setting for LTX-2: FLUX's rules
        # LTX-Video's pipeline facts (sampler settings: LTX2Pipeline computes the same shift, mu; size rules; batched
        # CFG; latent calibration output) with LTX-2's toy and call shape.
        pipeline=dataclasses.replace(
            LTX.pipeline, build_toy=_build_toy, call_shape=call_shape, toy_call_kwargs=_toy_call_kwargs
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=call_timestep,
            # A config.json says nothing of the call: the pipeline's 768x512, 121 frames, 1024 text tokens, CFG.
            json_defaults={**_fields(_REAL_LATENT, _REAL_AUDIO), "text_tokens": 1024, "batch": 2, "steps": 30},
            named=NAMED_CONFIGS,
            bench={"cpu": "ltx2-bench", "full": "ltx2-19b", "tiny": "ltx2-tiny"},
            tiny="ltx2-tiny",
        ),
    )
)
