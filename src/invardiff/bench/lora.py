"""Seeded random LoRAs for the composition tests and ``benchmarks/lora_recalibration.py``: a low-rank delta on the
attention and feed-forward Linear layers of a transformer's blocks, in the PEFT key layout that diffusers'
``pipe.load_lora_weights`` reads (``transformer.<module path>.lora_A.weight`` / ``.lora_B.weight``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..families import resolve_family


def lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Paths of the Linear layers a LoRA adapts here: every Linear inside the block lists (attention projections,
    feed-forward layers, Flux's single-block ``proj_mlp`` / ``proj_out``) except the adaLN modulation
    (``norm*.linear``), as LoRA trainers for Flux and Wan usually target them."""
    paths = []
    for spec in resolve_family(transformer).block_lists:
        for name, module in getattr(transformer, spec.attr).named_modules(prefix=spec.attr):
            if isinstance(module, torch.nn.Linear) and ".norm" not in name:
                paths.append(name)
    return paths


@torch.no_grad()
def random_lora(transformer: torch.nn.Module, rank: int = 4, strength: float = 0.1, seed: int = 0) -> dict:
    """A LoRA state dict for :func:`lora_targets`: for each layer ``W``, ``B @ A`` with ``A`` of shape (rank, in)
    and ``B`` (out, rank), seeded, scaled so that the low-rank term ``B A x`` of a random ``x`` has about
    ``strength`` times the spread of ``W x``. Loaded without an alpha, diffusers applies it at scale 1.

    Tensors are float32 on the CPU (a LoRA file's usual form); the transformer's weights are read, never changed.
    """
    if rank < 1 or strength <= 0:
        raise ValueError(f"A LoRA needs rank >= 1 and strength > 0, got rank={rank}, strength={strength}.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state = {}
    for path in lora_targets(transformer):
        layer = transformer.get_submodule(path)
        fan_in, fan_out = layer.in_features, layer.out_features
        spread = float(layer.weight.float().std())
        # For unit-variance x: Var((A x)_i) = 1, Var((B A x)_j) = rank Var(B), Var((W x)_j) = fan_in Var(W).
        down = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
        up = torch.randn(fan_out, rank, generator=generator) * (strength * spread * math.sqrt(fan_in / rank))
        state[f"transformer.{path}.lora_A.weight"] = down
        state[f"transformer.{path}.lora_B.weight"] = up
    return state


def save_lora(state: dict, path: str | Path) -> Path:
    """Write ``state`` as a safetensors file (temp file, then rename), for ``load_lora_weights(directory,
    weight_name=name)``."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(state, str(temporary))
    os.replace(temporary, path)
    return path
