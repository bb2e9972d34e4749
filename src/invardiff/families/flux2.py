"""FLUX.2 (diffusers ``Flux2Transformer2DModel``): 8 dual-stream blocks, then 48 parallel single-stream blocks.

Unlike FLUX.1, the modulation (shift, scale, gate) is computed once per call for all blocks of a list
(``double_stream_modulation_img`` / ``_txt``, ``single_stream_modulation``) and passed to every block as
``temb_mod*``: it always runs, outside the blocks. Units, read from the block forwards of diffusers 0.42.1:

* dual blocks (``Flux2TransformerBlock``): the joint attention ``attn`` (image and text in one call, reused only when
  both ``attn`` and ``context_attn`` are set; each output is added through its own gate), the image feed-forward
  ``ff`` and the text feed-forward ``ff_context`` (SwiGLU ``Flux2FeedForward``s, each added through its gate);
* single blocks (``Flux2SingleTransformerBlock``): one unit ``attn``, the ``Flux2ParallelSelfAttention`` module,
  which fuses attention and MLP (one input projection to QKV + MLP, one output projection over both), so they
  cannot be reused apart; its output is added to the joint text+image stream through the block's one gate.

Norms, modulation and gates always run; the step cache holds the image tokens entering ``norm_out``. The single
blocks carry text and image tokens as one stream, so the DiCache probe on a single block would see both (the probe
runs on the first blocks, which are dual blocks, whose image stream it reads).

``Flux2Pipeline`` is guidance-distilled: the guidance scale is a transformer input and every step is one call, with
no classifier-free guidance branches (``PipelineSpec.guided`` is off). It encodes prompts with a Mistral-3 model that
cannot be built offline cheaply, so the toy pipeline has no text encoder (and no VAE): it runs the stock pipeline from
``prompt_embeds`` and returns packed latents. Reference images (``image=``) add tokens to the image stream only; the
pipeline drops their outputs after the head. There is no official InvarDiff or DiCache code for FLUX.2: calibration
follows the generic official behaviour (DiT/Wan) with ``context_attn`` tied to ``attn``, and DiCache runs FLUX's
rules.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock

from .calibration_spec import FamilyCalibration
from .flux import call_shape, size_rules
from .model_config import ModelConfig
from .spec import (
    DUAL_STREAM_KINDS,
    BlockListSpec,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    ReuseUnit,
    dual_stream_units,
    image_output_index,
)
from .table import register_family


def _temb(transformer, call, dtype):
    # Flux2Transformer2DModel.forward's conditioning: timestep and guidance x 1000 in the block stack's dtype.
    timestep = call["timestep"].to(dtype) * 1000
    guidance = call["guidance"]
    guidance = None if guidance is None else guidance.to(dtype) * 1000
    return transformer.time_guidance_embed(timestep, guidance)  # (B, D)


def _embed_timestep(transformer, call):
    # The temb that the blocks' shared modulations and the head are computed from.
    return _temb(transformer, call, call["hidden_states"].dtype)


def _run_head(transformer, hidden, call):
    # The output section of Flux2Transformer2DModel.forward, on the cached image tokens.
    output = transformer.proj_out(transformer.norm_out(hidden, _temb(transformer, call, hidden.dtype)))  # (B, N, C)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction)  # Flux2Pipeline passes the flow-matching sigma, t / 1000


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, dtype = config.transformer_kwargs, config.batch, config.torch_dtype
    axes = len(kw["axes_dims_rope"])  # one position id per RoPE axis (FLUX.2: t, h, w, l)
    return {
        "hidden_states": randn(B, config.image_tokens, kw["in_channels"]),
        "encoder_hidden_states": randn(B, config.text_tokens, kw["joint_attention_dim"]),
        "timestep": torch.full((B,), fraction, device=device, dtype=dtype),
        "guidance": torch.full((B,), 4.0, device=device, dtype=dtype) if kw.get("guidance_embeds", True) else None,
        "img_ids": torch.zeros(config.image_tokens, axes, device=device),
        "txt_ids": torch.zeros(config.text_tokens, axes, device=device),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, num_single_layers, heads, head_dim, axes, joint_dim, in_channels=128, **other):
    """``Flux2Transformer2DModel`` arguments (patch size 1, MLP ratio 3, guidance-distilled, RoPE theta 2000)."""
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint_dim,
        "mlp_ratio": 3.0,
        "axes_dims_rope": tuple(axes),
        "rope_theta": 2000,
        "guidance_embeds": True,
        **other,
    }


NAMED_CONFIGS = (
    # FLUX.2-dev's transformer: the defaults and docstring of diffusers 0.42.1's Flux2Transformer2DModel (8 dual +
    # 48 single blocks, 48 heads of 128 = hidden 6144, 128 input channels = 32 VAE channels x 2x2 packing, text
    # width 15360 = 3 stacked Mistral-3 layers of 5120, RoPE axes (32, 32, 32, 32), theta 2000): 32.2B parameters,
    # the published "32B". The black-forest-labs/FLUX.2-dev transformer/config.json itself was not read here (no
    # network); third-party ports (mflux) state the same depth, heads and widths. At 1024x1024 px (VAE x8, then 2x2
    # packing: 4096 image tokens) with the pipeline's default 512 text tokens.
    ModelConfig(
        "flux2-dev",
        "flux2",
        transformer_kwargs(8, 48, 48, 128, (32, 32, 32, 32), 15360),
        "bfloat16",
        image_tokens=4096,
        text_tokens=512,
        description="FLUX.2-dev (8 dual + 48 single blocks, hidden 6144) at 1024x1024, 512 text tokens",
    ),
    ModelConfig(
        "flux2-bench",
        "flux2",
        transformer_kwargs(8, 48, 4, 64, (16, 16, 16, 16), 256, timestep_guidance_channels=64),
        image_tokens=256,
        text_tokens=64,
        description="FLUX.2 depth (8+48), hidden 256, 256 image + 64 text tokens (CPU benchmark)",
    ),
    ModelConfig(
        "flux2-tiny",
        "flux2",
        transformer_kwargs(2, 3, 2, 16, (4, 4, 4, 4), 32, in_channels=16, timestep_guidance_channels=16),
        image_tokens=16,
        text_tokens=8,
        description="tests: 2 dual + 3 single blocks, hidden 32",
    ),
)


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2-dev's scheduler: dynamic shifting (Flux2Pipeline passes mu for the image size), exponential time shift.
    # From the model's scheduler_config.json as I remember it (not verified here: no network).
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import Flux2Pipeline

    if text_encoders:
        raise NotImplementedError(
            "The FLUX.2 toy pipeline has no text encoder (a Mistral-3 model with its processor, not built offline); "
            "call it with prompt_embeds."
        )
    return Flux2Pipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    side = int(config.image_tokens**0.5) * 16  # 16 px per packed latent token (VAE x8, 2x2 packing)
    embeds = torch.randn(config.batch, config.text_tokens, kw["joint_attention_dim"], generator=generator)
    return {
        "prompt_embeds": embeds.to(device, config.torch_dtype),
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 4.0,  # distilled guidance: a transformer input, one call per step
        "output_type": "latent",  # packed latents: there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    # FLUX's packed-latent tokens; the text length is the given embeddings', else the cap
    shape = call_shape(pipe, call_kwargs)
    embeds = call_kwargs.get("prompt_embeds")
    return shape if embeds is None else {**shape, "text_tokens": embeds.shape[1]}


FLUX2 = register_family(
    FamilySpec(
        name="flux2",
        transformer_class=Flux2Transformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=DUAL_STREAM_KINDS,
                units=dual_stream_units(),
                image_output=image_output_index(Flux2TransformerBlock),
                per_sample_args=("temb_mod_img", "temb_mod_txt"),
            ),
            BlockListSpec(
                attr="single_transformer_blocks",
                module_kinds=("attn",),
                units=(ReuseUnit("attn", ("attn",), "attn"),),  # fused attention + MLP, one gated output
                image_output=image_output_index(Flux2SingleTransformerBlock),
                per_sample_args=("temb_mod",),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1000.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.x_embedder(call["hidden_states"]),  # (B, N_img, D)
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(
            correct_step=True,
            provisional_module_warmup=True,
            tied_kinds={"transformer_blocks.context_attn": "transformer_blocks.attn"},
        ),
        dicache_preset="flux",  # no official DiCache setting for FLUX.2: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},  # the decoded images are not needed
            guided=False,
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=size_rules,
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={"image_tokens": 4096, "text_tokens": 512},  # 1024x1024 px, 512 Mistral tokens
            named=NAMED_CONFIGS,
            bench={"cpu": "flux2-bench", "full": "flux2-dev", "tiny": "flux2-tiny"},
            tiny="flux2-tiny",
        ),
    )
)
