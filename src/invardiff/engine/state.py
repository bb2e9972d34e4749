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
    """A copy of ``target`` whose rows ``index`` are ``rows`` (through tuples); ``target`` is left untouched. ``rows``
    holds those rows alone, or the whole batch (a family whose deep blocks run on every sample,
    ``FamilySpec.cut_rows``), of which rows ``index`` are taken."""
    if torch.is_tensor(target):
        if rows.shape[0] != index.numel():
            rows = rows.index_select(0, index)
        return target.index_copy(0, index, rows)
    return type(target)(put_rows(t, index, r) for t, r in zip(target, rows, strict=True))


class BranchState:
    """State of one CFG branch (a ``cache_context`` name) during one run.

    Attributes:
        step: the step being executed, or that was last executed; ``None`` before the first step of a run.
        hidden: the cached pre-head hidden state H, or ``None``.
        units: the cached output of each unit (engine unit order), or ``None``.
        policy_state: what the policy keeps for this branch (``CachePolicy.new_branch``), or ``None``.
        step_status / unit_status: what was executed, for :func:`invardiff.summary`.

    Per call (set by the engine, read by the hooks and the policy): ``call``, ``action``, ``unit_reuse`` /
    ``unit_keep`` (the policy's unit actions), ``block_input``, ``compute_rows`` / ``skip_all`` (a probe's decision).
    """

    def __init__(self, name: str, num_steps: int, num_units: int):
        self.name = name
        self.num_steps = num_steps
        self.step: int | None = None
        self.call = None
        self.signature: tuple | None = None
        self.hidden = None
        self.units: list = [None] * num_units
        self.policy_state = None
        self.policy_bytes = 0  # the policy's held bytes as last accounted
        self.action = None
        self.unit_reuse = self.unit_keep = ()
        self.plain_units: list[int] = []  # units that compute without calling back (marked computed at the end)
        self.block_input = None  # the first block's image tokens x, while a probe policy runs
        self.compute_rows: torch.Tensor | None = None
        self.skip_all = False
        self.step_status = np.full(num_steps, NOT_RUN, dtype=np.int8)
        self.unit_status = np.full((num_steps, num_units), NOT_RUN, dtype=np.int8)

    def cached_bytes(self) -> int:
        return tensor_bytes(self.hidden) + sum(tensor_bytes(value) for value in self.units) + self.policy_bytes

    def end_call(self) -> None:
        self.call = self.action = self.block_input = None
        self.plain_units = []
        self.compute_rows, self.skip_all = None, False
