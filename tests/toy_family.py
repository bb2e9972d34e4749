"""A model family defined in one file, as a new family would be: a tiny diffusers-style transformer, its spec with
random-weight configs and example calls, registered with ``register_family``. No other file knows about it.

The transformer: a linear patch embedding, one list of pre-norm blocks (attention-like token mixing and a
feed-forward, each gated by the timestep embedding), and a head whose scale is conditioned on the timestep.

A second family, ``toy-open-end``, is the same model whose last block has no feed-forward (as SD3's last joint block
has no ``ff_context``): its spec says so with ``ReuseUnit(present=...)``, and the conformance kit runs it like any
other family.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from invardiff.families import BlockListSpec, ConfigSpec, FamilySpec, ReuseUnit, register_family
from invardiff.families.model_config import ModelConfig


class ToyMixer(torch.nn.Module):
    """Token mixing with softmax weights: a single-head self-attention in a few lines."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, D) each
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)  # (B, N, N)
        return self.out(weights @ v)


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int, ff: bool = True):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = ToyMixer(dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        feed_forward = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
        )
        self.ff = feed_forward if ff else None
        self.gates = torch.nn.Linear(dim, 2 * dim)

    def forward(self, hidden_states, temb):
        gate_attn, gate_ff = self.gates(temb)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        hidden_states = hidden_states + gate_attn * self.attn(self.norm1(hidden_states))
        if self.ff is None:
            return hidden_states
        return hidden_states + gate_ff * self.ff(self.norm2(hidden_states))


class ToyTransformer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 4, dim: int = 32, num_layers: int = 3, last_block_ff: bool = True):
        super().__init__()
        self.proj_in = torch.nn.Linear(in_channels, dim)
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(1, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.blocks = torch.nn.ModuleList(
            ToyBlock(dim, ff=last_block_ff or layer < num_layers - 1) for layer in range(num_layers)
        )
        self.norm_out = torch.nn.LayerNorm(dim)
        self.scale_out = torch.nn.Linear(dim, dim)
        self.proj_out = torch.nn.Linear(dim, in_channels)

    def embed_time(self, timestep, dtype):
        return self.time_embed(timestep.to(dtype)[:, None])  # (B, D)

    def head(self, hidden, temb):
        return self.proj_out(self.norm_out(hidden) * (1 + self.scale_out(temb))[:, None])

    def forward(self, hidden_states, timestep, return_dict: bool = True):
        temb = self.embed_time(timestep, hidden_states.dtype)
        hidden = self.proj_in(hidden_states)  # (B, N, D)
        for block in self.blocks:
            hidden = block(hidden, temb)
        output = self.head(hidden, temb)  # (B, N, C)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def _run_head(transformer, hidden, call):
    output = transformer.head(hidden, transformer.embed_time(call["timestep"], hidden.dtype))
    return Transformer2DModelOutput(sample=output) if call["return_dict"] else (output,)


def _example_call(config, device, fraction, randn):
    channels = config.transformer_kwargs["in_channels"]
    return {
        "hidden_states": randn(config.batch, config.image_tokens, channels),
        "timestep": torch.full((config.batch,), fraction, device=device, dtype=config.torch_dtype),
        "return_dict": False,
    }


TOY = register_family(
    FamilySpec(
        name="toy",
        transformer_class=ToyTransformer,
        block_lists=(
            BlockListSpec(
                attr="blocks",
                module_kinds=("attn", "ff"),
                units=(ReuseUnit("attn", ("attn",), "attn"), ReuseUnit("ff", ("ff",), "ff")),
                per_sample_args=("temb",),
            ),
        ),
        head_input="norm_out",
        timestep_scale=1000.0,
        run_head=_run_head,
        input_signature=lambda call: (tuple(call["hidden_states"].shape),),
        embed_input=lambda transformer, call: transformer.proj_in(call["hidden_states"]),
        configs=ConfigSpec(
            example_call=_example_call,
            call_timestep=lambda fraction, like: torch.full_like(like, fraction),
            json_defaults={"image_tokens": 16, "batch": 2},
            named=(ModelConfig("toy-tiny", "toy", {"in_channels": 4, "dim": 32, "num_layers": 3}, image_tokens=16),),
            bench={"tiny": "toy-tiny"},
            tiny="toy-tiny",
        ),
    )
)


class OpenEndToyTransformer(ToyTransformer):
    """The toy transformer of the ``toy-open-end`` family: built with ``last_block_ff=False``."""


_OPEN_END_CONFIG = ModelConfig(
    "toy-open-end-tiny",
    "toy-open-end",
    {"in_channels": 4, "dim": 32, "num_layers": 3, "last_block_ff": False},
    image_tokens=16,
    description="the toy whose last block has no feed-forward",
)
TOY_OPEN_END = register_family(
    dataclasses.replace(
        TOY,
        name="toy-open-end",
        transformer_class=OpenEndToyTransformer,
        block_lists=(
            BlockListSpec(
                attr="blocks",
                module_kinds=("attn", "ff"),
                units=(
                    ReuseUnit("attn", ("attn",), "attn"),
                    ReuseUnit("ff", ("ff",), "ff", present=lambda block: block.ff is not None),
                ),
                per_sample_args=("temb",),
            ),
        ),
        configs=dataclasses.replace(
            TOY.configs, named=(_OPEN_END_CONFIG,), bench={"tiny": _OPEN_END_CONFIG.name}, tiny=_OPEN_END_CONFIG.name
        ),
    )
)
