"""Per-branch run state: which step a CFG branch is at, its cached tensors and what it executed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


NOT_RUN, COMPUTED, REUSED = -1, 0, 1  # unit status; for steps REUSED means step-cached


@dataclass(frozen=True)
class UnitRef:
    """One reusable unit of one block: ``transformer_blocks.3`` / ``attn``."""

    block_list: str
    layer: int
    name: str
    kinds: tuple[str, ...]

    @property
    def fqn(self) -> str:
        return f"{self.block_list}.{self.layer}.{self.name}"


def tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    return 0


class BranchState:
    """State of one CFG branch (a ``cache_context`` name) during one run.

    Attributes:
        step: the step being executed, or that was last executed; ``None`` before the first step of a run.
        hidden: the cached pre-head hidden state H, or ``None``.
        units: the cached output of each unit (engine unit order), or ``None``.
        step_status / unit_status: what was executed, for :func:`invardiff.summary`.
    """

    def __init__(self, name: str, num_steps: int, num_units: int):
        self.name = name
        self.num_steps = num_steps
        self.step: int | None = None
        self.call = None
        self.signature: tuple | None = None
        self.hidden = None
        self.units: list = [None] * num_units
        self.step_status = np.full(num_steps, NOT_RUN, dtype=np.int8)
        self.unit_status = np.full((num_steps, num_units), NOT_RUN, dtype=np.int8)

    def cached_bytes(self) -> int:
        return tensor_bytes(self.hidden) + sum(tensor_bytes(value) for value in self.units)

    def clear_tensors(self) -> None:
        self.hidden = None
        self.units = [None] * len(self.units)
