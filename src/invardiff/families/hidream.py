"""HiDream-I1 (diffusers ``HiDreamImageTransformer2DModel``, 17B): 16 double-stream blocks, then 32 single-stream
blocks, with mixture-of-experts feed-forwards.

Each block of both lists is a ``HiDreamBlock`` wrapping the real block at ``block``. Double-stream units: the joint
attention ``block.attn1`` (image and text in one call, reused only when both ``attn`` and ``context_attn`` are set),
the image feed-forward ``block.ff_i`` (kind ``ff``: the MoE, its gate, routed and shared experts as one unit) and the
text feed-forward ``block.ff_t`` (kind ``context_ff``, a plain SwiGLU). Single-stream units: the attention
``block.attn1`` (kind ``attn``) and the MoE feed-forward ``block.ff_i`` (kind ``ff``), over the image tokens, the text
carried from the double blocks and each block's Llama-layer tokens. Norms, modulation and gates always run; the step
cache holds the image tokens entering ``final_layer``.

The stock forward feeds every block its own Llama hidden state (``llama_layers``), concatenated with the text stream
between the blocks at full batch: the deep blocks of a probe step therefore cut the computing rows out of their own
inputs and write their outputs back into the full batch (``FamilySpec.rows_in_place``), instead of the block stream
being cut once after the probe.

``HiDreamImagePipeline`` batches classifier-free guidance in one call (the negative rows first) and passes the
scheduler's timestep as it is. Its four text encoders (CLIP-L, CLIP-G, T5-XXL, Llama-3.1-8B) are not built offline:
the toy pipeline runs from precomputed ``pooled_prompt_embeds``, ``prompt_embeds_t5`` and ``prompt_embeds_llama3``
(and their negatives) without a VAE (``output_type="latent"``). The pipeline scales any requested size to the area
of its default size (1024x1024 px), keeping the aspect ratio, so its sizes follow no size rule. There is no official
InvarDiff or DiCache code for HiDream: calibration follows the generic official behaviour (DiT/Wan) with
``context_attn`` tied to ``attn``, and DiCache runs FLUX's rules. HiDream-I1-Dev and -Fast (guidance-distilled, no
CFG, Euler schedulers) share the transformer.
"""

from __future__ import annotations

import types

import torch
from diffusers import HiDreamImageTransformer2DModel, UniPCMultistepScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_hidream_image import HiDreamBlock, MOEFeedForwardSwiGLU

from .calibration_spec import FamilyCalibration
from .model_config import ModelConfig
from .spec import (
    DUAL_STREAM_KINDS,
    BlockListSpec,
    BlockOutputs,
    ConfigSpec,
    FamilySpec,
    PipelineSpec,
    ReuseUnit,
    describe_block_outputs,
)
from .table import register_family


# diffusers' block registry has no entry for the wrapper: a double-stream block returns (image, text), a single-stream
# block the image-and-text sequence alone (its list says so with image_output=None).
describe_block_outputs(HiDreamBlock, BlockOutputs(hidden_index=0, encoder_index=1))

_PER_SAMPLE = ("hidden_states_masks", "temb", "image_rotary_emb")


def _embed_timestep(transformer, call):
    # HiDreamImageTransformer2DModel.forward's temb (B, D): the timestep embedding (in the latent's dtype) plus the
    # pooled-text embedding, which every block and the final layer modulate with. The sum is no module's output:
    # the blocks receive it as their `temb` argument.
    timesteps = transformer.t_embedder(call["timesteps"], call["hidden_states"].dtype)
    return timesteps + transformer.p_embedder(call["pooled_embeds"])


def _embed_input(transformer, call):
    # The image tokens entering the first double-stream block (B, N_img, D): the forward patchifies a (B, C, H, W)
    # latent itself (padding a non-square one to max_resolution) unless it comes patchified with its mask.
    states = call["hidden_states"]
    if call["hidden_states_masks"] is None:
        states = transformer.patchify(states)[0]
    return transformer.x_embedder(states)


def _run_head(transformer, hidden, call):
    # The output section of HiDreamImageTransformer2DModel.forward, on the cached image tokens.
    latents = call["hidden_states"]
    output = transformer.final_layer(hidden, _embed_timestep(transformer, call))  # (B, N_img, p*p*C)
    if call["hidden_states_masks"] is None:  # the forward patchified the latents: its grid is theirs
        patch = transformer.config.patch_size
        sizes = [(latents.shape[-2] // patch, latents.shape[-1] // patch)] * latents.shape[0]
    else:
        sizes = call["img_sizes"]
    output = transformer.unpatchify(output, sizes, transformer.training)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (
        tuple(call["hidden_states"].shape),
        tuple(call["encoder_hidden_states_t5"].shape),
        tuple(call["encoder_hidden_states_llama3"].shape),
    )


def _call_timestep(fraction: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, fraction * 1000)  # the pipeline passes the scheduler's timestep in [0, 1000]


def _latent_side(config: ModelConfig) -> int:
    side = round(config.image_tokens**0.5)
    if side * side != config.image_tokens:
        raise ValueError(
            f"Config {config.name!r}: image_tokens={config.image_tokens} is not a square; HiDream example calls use "
            f"square images (a non-square latent is padded to max_resolution), so give a square number of tokens."
        )
    return side * config.transformer_kwargs["patch_size"]


def _llama_states(config: ModelConfig) -> int:
    return max(config.transformer_kwargs["llama_layers"]) + 1


def _example_call(config: ModelConfig, device, fraction: float, randn) -> dict:
    kw, B, side = config.transformer_kwargs, config.batch, _latent_side(config)
    t5_dim, llama_dim = kw["caption_channels"]
    return {
        "hidden_states": randn(B, kw["in_channels"], side, side),
        "timesteps": torch.full((B,), fraction * 1000, device=device, dtype=config.torch_dtype),
        "encoder_hidden_states_t5": randn(B, config.text_tokens, t5_dim),
        "encoder_hidden_states_llama3": randn(_llama_states(config), B, config.text_tokens, llama_dim),
        "pooled_embeds": randn(B, kw["text_emb_dim"]),
        "return_dict": False,
    }


def transformer_kwargs(num_layers, num_single_layers, heads, head_dim, axes, caption, text_emb_dim, **other):
    """``HiDreamImageTransformer2DModel`` arguments (patch 2, 16 latent channels, 4 routed experts of which 2 are
    active, unless given); ``llama_layers`` default: HiDream-I1's (Llama layers 0-31, then 31 for the rest)."""
    blocks = num_layers + num_single_layers
    return {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "caption_channels": tuple(caption),
        "text_emb_dim": text_emb_dim,
        "num_routed_experts": 4,
        "num_activated_experts": 2,
        "axes_dims_rope": tuple(axes),
        "max_resolution": (128, 128),
        "llama_layers": tuple(min(i, 31) for i in range(blocks)),
        **other,
    }


_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "num_routed_experts": 2,
    "num_activated_experts": 1,
    "max_resolution": (16, 16),
    "llama_layers": (0, 1, 1, 1, 1),
}
NAMED_CONFIGS = (
    # HiDream-ai/HiDream-I1-Full transformer/config.json (from memory of the published file, matching the config in
    # third-party conversion scripts; not re-read from the Hub offline): patch 2, 16 latent channels in and out,
    # 16 double and 32 single blocks, 20 heads of 128 (hidden 2560), caption_channels (4096, 4096) (T5-XXL and
    # Llama-3.1-8B), text_emb_dim 2048 (CLIP-L 768 + CLIP-G 1280 pooled), 4 routed experts with 2 active, RoPE
    # axes (64, 32, 32), max_resolution (128, 128), llama_layers 0..31 then 31 for the last 16 blocks. The call:
    # 1024x1024 (a 128x128 latent, 4096 tokens), the pipeline's default 128 T5 and 128 Llama tokens, batched CFG
    # (guidance 5.0), 50 steps.
    ModelConfig(
        "hidream-i1-full",
        "hidream",
        transformer_kwargs(16, 32, 20, 128, (64, 32, 32), (4096, 4096), 2048),
        "bfloat16",
        image_tokens=4096,
        text_tokens=128,
        batch=2,
        steps=50,
        description="HiDream-I1-Full (16 double + 32 single MoE blocks, hidden 2560, 17B) at 1024x1024, 128 T5 + "
        "128 Llama tokens, batched CFG",
    ),
    ModelConfig(
        "hidream-bench",
        "hidream",
        # Hidden 128, not 256 as the other families' bench configs: the MoE feed-forwards (2 active experts and a
        # shared one) make a HiDream block ~4x as costly, and this keeps a call near sd3-bench's FLOPs.
        transformer_kwargs(16, 32, 2, 64, (32, 16, 16), (128, 128), 128),
        image_tokens=256,
        text_tokens=32,
        batch=2,
        description="HiDream-I1 depth (16+32), hidden 128, 256 image + 32 T5 + 32 Llama tokens, batched CFG "
        "(CPU benchmark)",
    ),
    ModelConfig(
        "hidream-tiny",
        "hidream",
        transformer_kwargs(2, 3, 2, 16, (8, 4, 4), (16, 16), 16, **_TINY),
        image_tokens=16,
        text_tokens=8,
        batch=2,
        description="tests: 2 double + 3 single blocks, 2 experts (1 active), batched CFG",
    ),
)


def _meta_moe_infer(moe, x, flat_expert_indices, flat_expert_weights):
    # On the meta device the routing cannot be read (the stock moe_infer counts each expert's tokens on the host).
    # Every token goes through num_activated_experts experts of one size, so that many passes of all tokens through
    # one expert cost the routed passes' FLOPs, whatever the routing; the weighting and the sum are elementwise.
    out = moe.experts[0](x.repeat_interleave(moe.num_activated_experts, dim=0))
    return out.view(x.shape[0], moe.num_activated_experts, -1).sum(dim=1)


def _on_meta(transformer) -> None:
    # On this meta instance only: the MoE above, and the patch grid as Python ints (the stock patchify returns it as
    # a tensor, which unpatchify reads value by value); both are computed from shapes alike.
    for module in transformer.modules():
        if isinstance(module, MOEFeedForwardSwiGLU):
            module.moe_infer = types.MethodType(_meta_moe_infer, module)
    stock_patchify = transformer.patchify

    def patchify(hidden_states):
        patched, masks, _, ids = stock_patchify(hidden_states)
        patch = transformer.config.patch_size
        grid = [(hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch)] * hidden_states.shape[0]
        return patched, masks, grid, ids

    transformer.patchify = patchify


def _scheduler() -> UniPCMultistepScheduler:
    # HiDream-ai/HiDream-I1-Full scheduler/scheduler_config.json (from memory, not re-checked offline): UniPC with
    # flow sigmas, flow_shift 3.0, flow prediction. One transformer call per step.
    return UniPCMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")


def _build_toy(config: ModelConfig, transformer, text_encoders: bool = False):
    from diffusers import HiDreamImagePipeline

    if text_encoders:
        raise NotImplementedError(
            "The HiDream toy pipeline has no text encoders (CLIP-L, CLIP-G, T5-XXL and Llama-3.1-8B); call it with "
            "pooled_prompt_embeds, prompt_embeds_t5 and prompt_embeds_llama3 (and their negatives)."
        )
    encoders = {f"{kind}{i}": None for i in ("", "_2", "_3", "_4") for kind in ("text_encoder", "tokenizer")}
    pipe = HiDreamImagePipeline(scheduler=_scheduler(), vae=None, transformer=transformer, **encoders)
    # The pipeline scales every requested size to the area of its default size (128 latent rows: 1024x1024 px),
    # keeping only the aspect ratio: the toy's default size is its config's latent.
    pipe.default_sample_size = _latent_side(config)
    return pipe


def _toy_call_kwargs(config: ModelConfig, num_inference_steps: int, seed: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kw = config.transformer_kwargs
    samples = max(1, config.batch // 2)  # batch = samples x CFG halves
    t5_dim, llama_dim = kw["caption_channels"]
    cast = {"device": device, "dtype": config.torch_dtype}
    t5 = torch.randn(2, samples, config.text_tokens, t5_dim, generator=generator).to(**cast)
    llama = torch.randn(2, _llama_states(config), samples, config.text_tokens, llama_dim, generator=generator)
    pooled = torch.randn(2, samples, kw["text_emb_dim"], generator=generator).to(**cast)
    side = _latent_side(config) * 8  # the pipeline's VAE factor without a VAE
    return {
        "prompt_embeds_t5": t5[0],
        "negative_prompt_embeds_t5": t5[1],
        "prompt_embeds_llama3": llama[0].to(**cast),
        "negative_prompt_embeds_llama3": llama[1].to(**cast),
        "pooled_prompt_embeds": pooled[0],
        "negative_pooled_prompt_embeds": pooled[1],
        "height": side,
        "width": side,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 5.0,  # batched CFG: one call of 2 x samples rows per step
        "output_type": "latent",  # there is no VAE
        "generator": generator,
    }


def _call_shape(pipe, call_kwargs: dict) -> dict:
    pixels_per_token = 2 * pipe.vae_scale_factor  # VAE downsampling, then 2x2 patches
    default = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = call_kwargs.get("height") or default, call_kwargs.get("width") or default
    # HiDreamImagePipeline keeps the aspect ratio only: it scales the size to the default area, rounded down to
    # whole tokens.
    scale = (default * default / (width * height)) ** 0.5
    height = int(height * scale // pixels_per_token * pixels_per_token)
    width = int(width * scale // pixels_per_token * pixels_per_token)
    guided = call_kwargs.get("guidance_scale", 5.0) > 1
    text = call_kwargs.get("max_sequence_length") or 128  # T5 and Llama each (the pipeline pads both to it)
    # The transformer pads a non-square latent's tokens to max_resolution's (masked): it computes on all of them.
    square = height == width
    tokens = (height // pixels_per_token) * (width // pixels_per_token) if square else pipe.transformer.max_seq
    return {"image_tokens": tokens, "text_tokens": text, "batch": 2 if guided else 1}


def _double_units() -> tuple[ReuseUnit, ...]:
    return (
        ReuseUnit("attn", ("attn", "context_attn"), "block.attn1", kind_outputs=(0, 1)),
        ReuseUnit("ff", ("ff",), "block.ff_i"),
        ReuseUnit("context_ff", ("context_ff",), "block.ff_t"),
    )


HIDREAM = register_family(
    FamilySpec(
        name="hidream",
        transformer_class=HiDreamImageTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="double_stream_blocks",
                module_kinds=DUAL_STREAM_KINDS,
                units=_double_units(),
                image_output=0,  # (image, text)
                per_sample_args=_PER_SAMPLE,
            ),
            BlockListSpec(
                attr="single_stream_blocks",
                module_kinds=("attn", "ff"),
                units=(ReuseUnit("attn", ("attn",), "block.attn1"), ReuseUnit("ff", ("ff",), "block.ff_i")),
                image_output=None,  # the image-and-text sequence alone
                per_sample_args=_PER_SAMPLE,
            ),
        ),
        head_input="final_layer",
        timestep_scale=1.0,
        timestep_arg="timesteps",
        rows_in_place=True,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=_embed_input,
        embed_timestep=_embed_timestep,
        calibration=FamilyCalibration(
            correct_step=True,
            provisional_module_warmup=True,
            tied_kinds={"double_stream_blocks.context_attn": "double_stream_blocks.attn"},
        ),
        dicache_preset="flux",  # no official DiCache setting for HiDream: FLUX's rules
        pipeline=PipelineSpec(
            input_kind="prompt",
            output_type="pt",
            scheduler=_scheduler,
            calibration_kwargs={"output_type": "latent"},
            batched_cfg=True,
            build_toy=_build_toy,
            call_shape=_call_shape,
            size_rules=None,  # any size: the pipeline rescales it to its default area, keeping the aspect ratio
            toy_call_kwargs=_toy_call_kwargs,
        ),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=_call_timestep,
            json_defaults={"image_tokens": 4096, "text_tokens": 128, "batch": 2, "steps": 50},
            named=NAMED_CONFIGS,
            bench={"cpu": "hidream-bench", "full": "hidream-i1-full", "tiny": "hidream-tiny"},
            tiny="hidream-tiny",
            on_meta=_on_meta,
        ),
    )
)
