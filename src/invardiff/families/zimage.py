"""Z-Image (diffusers ``ZImageTransformer2DModel``, Tongyi-MAI Z-Image / Z-Image-Turbo, 6B): a single-stream DiT.

The stock forward embeds the image patches and runs them through ``noise_refiner`` (2 timestep-modulated blocks over
the image tokens alone), embeds the caption and runs it through ``context_refiner`` (2 unmodulated blocks over the
text alone), joins both per sample into one sequence ``[image (padded to a multiple of 32), text (padded)]`` (padded
across the batch, with an attention mask when the lengths differ), runs the 30 ``layers`` on it, and applies the
final layer (timestep-modulated norm and linear) to the whole sequence before cutting the image tokens back out per
sample (``unpatchify``). The output is a list of per-sample ``(C, F, H, W)`` tensors.

Reusable: ``layers`` only, units the attention ``attention`` (kind ``attn``, its output before ``attention_norm2``
and the gate) and the SwiGLU ``feed_forward`` (kind ``ff``, before ``ffn_norm2`` and the gate); the RMS norms,
modulation and tanh gates always run. The refiners are not block lists: they are 4 of 34 blocks over a part of the
sequence each (the noise refiner over the image tokens, the context refiner over the text), and the unified sequence
is assembled from their outputs by per-sample Python loops, so a probe or a per-sample subset of rows inside them
could not reach the main stack (the stack's first block is where the DiCache probe records its input). The context
refiner does not see the timestep: within a branch its output is the same at every step, which is exact to reuse
but is another cache (per run, not per step) than a plan's; it is left computing. The step cache holds the whole
unified sequence (image and text tokens) entering the final layer ``all_final_layer["2-1"]``; ``run_head`` reruns
the timestep embedding, that layer and ``unpatchify``.

``ZImagePipeline`` batches classifier-free guidance in one call (the conditional rows first) when
``guidance_scale > 0``, and passes the timestep reversed: ``(1000 - t) / 1000`` (0 = noise, 1 = clean), which the
spec's ``timestep_offset`` / ``timestep_scale`` map back onto the schedule. ``cfg_truncation < 1`` switches guidance
off mid-run, halving the batch: the engine refuses that (input shapes must stay constant within a run).
Z-Image-Turbo is an 8-step distilled model run without guidance (``num_inference_steps=9, guidance_scale=0``: one
call of one row per step); the calibration and DiCache defaults here are the generic ones, not tuned for so few
steps. There is no official InvarDiff or DiCache code for Z-Image: calibration follows the generic official behaviour
(DiT/Wan) and DiCache runs FLUX's rules.

Not supported: the Omni mode (nested per-sample lists of images with SigLIP features, ``ZImageOmniPipeline``), whose
per-token modulation the engine's row cuts cannot split: its calls are refused with ``NotImplementedError``.
ControlNet residuals work with plans; the probe policies refuse them (as for every family).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

from .calibration_spec import FamilyCalibration
from .flux import size_rules
from .model_config import ModelConfig
from .spec import BlockListSpec, BlockOutputs, ConfigSpec, FamilySpec, PipelineSpec, ReuseUnit, describe_block_outputs
from .table import register_family


# diffusers' block registry describes the block's output but names its input ``hidden_states``; it is ``x``.
describe_block_outputs(ZImageTransformerBlock, BlockOutputs(hidden_arg="x"))

_SEQ_MULTIPLE = 32  # the transformer pads the image and the text tokens of each sample to a multiple of 32


def _head_key(call) -> str:
    return f"{call['patch_size']}-{call['f_patch_size']}"


def _embed_timestep(transformer, call):
    # ZImageTransformer2DModel.forward's adaln_input (basic mode) (B, D): the timestep embedding in the latents'
    # dtype, which the refiners, the layers and the final layer modulate with.
    return transformer.t_embedder(call["t"] * transformer.t_scale).type_as(call["x"][0])


def _run_head(transformer, hidden, call):
    # The output section of ZImageTransformer2DModel.forward (basic mode), on the cached unified sequence.
    x = call["x"]
    adaln_input = _embed_timestep(transformer, call)
    out = transformer.all_final_layer[_head_key(call)](hidden, c=adaln_input)  # (B, N, p*p*pf*C)
    sizes = [tuple(item.shape[1:]) for item in x]  # (F, H, W) of each sample's latent
    output = transformer.unpatchify(list(out.unbind(dim=0)), sizes, call["patch_size"], call["f_patch_size"])
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    x = call["x"]
    if isinstance(x[0], list):
        raise NotImplementedError(
            "invardiff does not support ZImageTransformer2DModel's Omni mode (x as per-sample lists of images, "
            "ZImageOmniPipeline): its per-token modulation cannot be split by per-sample caching; use it without "
            "invardiff, or call the transformer in basic mode (one latent tensor per sample)."
        )
    return (tuple(tuple(item.shape) for item in x), tuple(tuple(item.shape) for item in call["cap_feats"]))


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, 1.0 - fraction)  # ZImagePipeline passes (1000 - t) / 1000: 0 = pure noise


def _latent_side(config: ModelConfig) -> int:
    side = round(config.image_tokens**0.5)  # 2x2 patches per side of the latent
    if side * side != config.image_tokens:
        raise ValueError(
            f"Config {config.name!r}: image_tokens={config.image_tokens} is not a square; Z-Image example calls use "
            f"square images, so give a square number of tokens (e.g. {side * side})."
        )
    return side * config.transformer_kwargs["all_patch_size"][0]


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, side = config.transformer_kwargs, _latent_side(config)
    return {
        "x": [randn(kw["in_channels"], 1, side, side) for _ in range(config.batch)],  # (C, F, H, W) per sample
        "t": torch.full((config.batch,), 1.0 - fraction, device=device, dtype=config.torch_dtype),
        "cap_feats": [randn(config.text_tokens, kw["cap_feat_dim"]) for _ in range(config.batch)],
        "return_dict": False,
    }


def transformer_kwargs(n_layers, dim, n_heads, axes_dims, cap_feat_dim, n_refiner_layers=2, **other):
    """``ZImageTransformer2DModel`` arguments (patch 2, one frame, 16 latent channels unless given)."""
    return {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": dim,
        "n_layers": n_layers,
        "n_refiner_layers": n_refiner_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": cap_feat_dim,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": tuple(axes_dims),
        **other,
    }


NAMED_CONFIGS = (
    # Tongyi-MAI/Z-Image-Turbo transformer/config.json (from memory of the published file, matching third-party
    # copies of it; not re-read from the Hub offline): patch 2 / frame patch 1, 16 latent channels, dim 3840 with
    # 30 heads of 128 (n_kv_heads 30), 30 layers and 2 refiner layers, qk_norm, norm_eps 1e-5, cap_feat_dim 2560
    # (Qwen3-4B's hidden size), RoPE theta 256 over axes (32, 48, 48) with lengths (1536, 512, 512), t_scale 1000.
    # Z-Image (the non-distilled base) shares the architecture. The call: 1024x1024 (a 128x128 latent, 4096 tokens)
    # with an assumed 128 prompt tokens (the pipeline keeps a prompt's real length, up to max_sequence_length 512),
    # Turbo's 9 steps without guidance: one row per call.
    ModelConfig(
        "z-image-turbo",
        "zimage",
        transformer_kwargs(30, 3840, 30, (32, 48, 48), 2560, axes_lens=(1536, 512, 512)),
        "bfloat16",
        image_tokens=4096,
        text_tokens=128,
        steps=9,
        description="Z-Image-Turbo (30 single-stream layers + 2+2 refiners, dim 3840, 6B) at 1024x1024, 128 text "
        "tokens, no CFG (8-step distilled)",
    ),
    ModelConfig(
        "zimage-bench",
        "zimage",
        transformer_kwargs(30, 256, 4, (16, 24, 24), 256, axes_lens=(1536, 512, 512)),
        image_tokens=256,
        text_tokens=64,
        batch=2,
        description="Z-Image depth (30 + 2+2 refiners), dim 256, 256 image + 64 text tokens, batched CFG "
        "(CPU benchmark)",
    ),
    ModelConfig(
        "zimage-tiny",
        "zimage",
        transformer_kwargs(3, 32, 2, (4, 6, 6), 16, n_refiner_layers=1, in_channels=4, axes_lens=(128, 16, 16)),
        image_tokens=16,
        text_tokens=8,
        batch=2,
        description="tests: 3 layers, 1+1 refiners, batched CFG",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json (from memory, not re-checked offline): shift 3.0,
    # no dynamic shifting.
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import ZImagePipeline

    if text_encoders:
        raise NotImplementedError(
            "The Z-Image toy pipeline has no text encoder (Qwen3 with its chat template cannot be built small "
            "offline); call it with prompt_embeds and negative_prompt_embeds (lists of (tokens, cap_feat_dim))."
        )
    return ZImagePipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    samples = max(1, config.batch // 2)  # batch = samples x CFG halves
    embeds = torch.randn(2, samples, config.text_tokens, kw["cap_feat_dim"], generator=generator)
    cast = {"device": device, "dtype": config.torch_dtype}
    side = _latent_side(config) * 8  # the pipeline's VAE factor without a VAE
    return {
        "prompt_embeds": [item.to(**cast) for item in embeds[0]],
        "negative_prompt_embeds": [item.to(**cast) for item in embeds[1]],
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 4.0,  # > 0: batched CFG, one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    pixels_per_token = 2 * pipe.vae_scale_factor  # VAE downsampling, then 2x2 patches
    height, width = call_kwargs.get("height") or 1024, call_kwargs.get("width") or 1024
    embeds = call_kwargs.get("prompt_embeds")
    # The prompt's own length where its embeddings are given, else the cap (the pipeline keeps a prompt's length).
    text = max(len(item) for item in embeds) if embeds else call_kwargs.get("max_sequence_length") or 512
    text = -(-text // _SEQ_MULTIPLE) * _SEQ_MULTIPLE  # padded as the transformer pads it
    guided = call_kwargs.get("guidance_scale", 5.0) > 0  # ZImagePipeline guides whenever the scale is positive
    tokens = (height // pixels_per_token) * (width // pixels_per_token)
    return {"image_tokens": tokens, "text_tokens": text, "batch": 2 if guided else 1}


ZIMAGE = register_family(
    FamilySpec(
        name="zimage",
        transformer_class=ZImageTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="layers",
                module_kinds=("attn", "ff"),
                units=(ReuseUnit("attn", ("attn",), "attention"), ReuseUnit("ff", ("ff",), "feed_forward")),
                image_output=None,  # a block returns the unified sequence alone
                # The Omni mode's noise mask and its two modulations are per sample too (refused, see the docstring).
                per_sample_args=("attn_mask", "freqs_cis", "adaln_input"),
            ),
        ),
        head_input="all_final_layer.2-1",
        timestep_scale=-1000.0,  # the schedule's t = 1000 - 1000 * the call's timestep
        timestep_offset=1000.0,
        timestep_arg="t",
        latent_arg="x",
        run_head=_run_head,
        input_signature=_input_signature,
        # No embed_input: the first layer's input is the unified sequence, which the forward assembles from the
        # noise refiner's output (2 timestep-modulated blocks over the image tokens) and the context refiner's by
        # per-sample Python loops with padding; computing it would rerun those 4 blocks and restate that assembly,
        # and it is not the patch-embedded image tokens that residual step reuse and input-deciding policies want.
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(correct_step=True, provisional_module_warmup=True),
        dicache_preset="flux",  # no official DiCache setting for Z-Image: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=size_rules,  # 16 px per token, as FLUX's packed latents (the pipeline refuses other sizes)
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={"image_tokens": 4096, "text_tokens": 128, "batch": 1, "steps": 9},
            named=NAMED_CONFIGS,
            bench={"cpu": "zimage-bench", "full": "z-image-turbo", "tiny": "zimage-tiny"},
            tiny="zimage-tiny",
        ),
    )
)
