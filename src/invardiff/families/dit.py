"""DiT (diffusers ``DiTTransformer2DModel``, e.g. DiT-XL/2): 28 adaLN-Zero blocks.

Each block's self-attention (``attn1``, kind ``attn``) and MLP (``ff``, kind ``ff``) can be reused; the adaLN
modulation, the gates, the final adaLN and the linear head are always recomputed. The step cache holds the tokens
entering ``norm_out``. Classifier-free guidance is batched by ``DiTPipeline`` (one call, both halves), so the two
halves share one plan and each cached tensor holds both, aligned by batch position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from . import register_family
from .spec import BlockListSpec, FamilySpec, ReuseUnit


def _run_head(transformer, hidden, call):
    # Same as the output section of DiTTransformer2DModel.forward, on the cached tokens.
    timestep, class_labels = call["timestep"], call["class_labels"]
    conditioning = transformer.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden.dtype)
    shift, scale = transformer.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)  # (B, D) each
    hidden = transformer.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)
    hidden = transformer.proj_out_2(hidden)  # (B, N, p*p*C)
    patch, channels = transformer.patch_size, transformer.out_channels
    side = int(hidden.shape[1] ** 0.5)
    hidden = hidden.reshape(-1, side, side, patch, patch, channels)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    output = hidden.reshape(-1, channels, side * patch, side * patch)  # (B, C, H, W)
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _input_signature(call):
    return (tuple(call["hidden_states"].shape),)


DIT = register_family(
    FamilySpec(
        name="dit",
        transformer_class=DiTTransformer2DModel,
        block_lists=(
            BlockListSpec(
                attr="transformer_blocks",
                module_kinds=("attn", "ff"),
                units=(ReuseUnit("attn", ("attn",), "attn1"), ReuseUnit("ff", ("ff",), "ff")),
                per_sample_args=("timestep", "class_labels"),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1.0,
        run_head=_run_head,
        input_signature=_input_signature,
        embed_input=lambda transformer, call: transformer.pos_embed(call["hidden_states"]),  # (B, N, D)
    )
)
