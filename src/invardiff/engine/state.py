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


def take_rows(value, index: torch.Tensor):
    """``value[index]`` along the batch dimension, through tuples and lists (block outputs, cached units)."""
    if torch.is_tensor(value):
        return value if value.ndim == 0 else value.index_select(0, index)  # a 0-d timestep is shared
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(item, index) for item in value)
    return value


def put_rows(target, index: torch.Tensor, rows):
    """A copy of ``target`` whose rows ``index`` are ``rows`` (through tuples); ``target`` is left untouched."""
    if torch.is_tensor(target):
        return target.index_copy(0, index, rows)
    return type(target)(put_rows(t, index, r) for t, r in zip(target, rows, strict=True))


class BranchState:
    """State of one CFG branch (a ``cache_context`` name) during one run.

    Attributes:
        step: the step being executed, or that was last executed; ``None`` before the first step of a run.
        hidden: the cached pre-head hidden state H, or ``None``.
        probe: the probe policies' references, accumulators and residual windows, or ``None``.
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
        self.probe = None  # the DiCache / plan+probe state of this branch (dicache.controller.ProbeBranch)
        self.step_status = np.full(num_steps, NOT_RUN, dtype=np.int8)
        self.unit_status = np.full((num_steps, num_units), NOT_RUN, dtype=np.int8)

    def cached_bytes(self) -> int:
        probe_bytes = self.probe.accounted_bytes if self.probe is not None else 0
        return tensor_bytes(self.hidden) + sum(tensor_bytes(value) for value in self.units) + probe_bytes

    def clear_tensors(self) -> None:
        self.hidden = None
        if self.probe is not None:
            self.probe.drop_tensors()  # its records stay for summaries
        self.units = [None] * len(self.units)
