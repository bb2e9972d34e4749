"""FLUX.1 (diffusers ``FluxTransformer2DModel``): 19 dual-stream blocks, then 38 single-stream blocks.

Dual blocks: the joint attention (image and text together) is one call, reused only when both ``attn`` and
``context_attn`` are set; ``ff`` (image) and ``context_ff`` (text) feed-forwards. Single blocks (which take text
and image separately since diffusers 0.35): ``attn`` and ``mlp`` = ``act_mlp(proj_mlp(x))``; their ``proj_out``
over the concatenation, the norm and the gate are always paid. The step cache holds the image tokens entering
``norm_out``.
"""

from __future__ import annotations

from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from . import register_family
from .spec import BlockListSpec, FamilySpec, ReuseUnit


def _run_head(transformer, hidden, call):
    # Same conditioning as FluxTransformer2DModel.forward, on the cached image tokens instead of the block stack.
    timestep = call["timestep"].to(hidden.dtype) * 1000
    guidance = call["guidance"]
    pooled = call["pooled_projections"]
    if guidance is None:
        temb = transformer.time_text_embed(timestep, pooled)
    else:
        temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
    output = transformer.proj_out(transformer.norm_out(hidden, temb))  # (B, N_img, C)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape), tuple(call["encoder_hidden_states"].shape))


FLUX = register_family(
    FamilySpec(
        name="flux",
        transformer_class=FluxTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=("attn", "context_attn", "ff", "context_ff"),
                units=(
                    ReuseUnit("attn", ("attn", "context_attn"), "attn", kind_outputs=(0, 1)),
                    ReuseUnit("ff", ("ff",), "ff"),
                    ReuseUnit("context_ff", ("context_ff",), "ff_context"),
                ),
                image_output=1,
                per_sample_args=("temb",),
            ),
            BlockListSpec(
                attr="single_transformer_blocks",
                module_kinds=("attn", "mlp"),
                units=(
                    ReuseUnit("attn", ("attn",), "attn"),
                    ReuseUnit("mlp", ("mlp",), "proj_mlp", passthrough="act_mlp"),
                ),
                image_output=1,
                per_sample_args=("temb",),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1000.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.x_embedder(call["hidden_states"]),  # (B, N_img, D)
    )
)
