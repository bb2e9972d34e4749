"""What a run executed: per branch, step, layer and unit, computed or reused; and the cache memory it held."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .state import COMPUTED, NOT_RUN, REUSED


_STEP_NAMES = {NOT_RUN: "not_run", COMPUTED: "computed", REUSED: "step_cached"}


@dataclass
class BranchSummary:
    """Execution record of one CFG branch.

    Attributes:
        step_status: ``(T,)`` array: -1 not run, 0 computed, 1 step-cached.
        unit_status: ``{block_list: {unit: (T, L) array}}``: -1 not executed (or step-cached), 0 computed,
            1 reused.
    """

    name: str
    step_status: np.ndarray
    unit_status: dict[str, dict[str, np.ndarray]]
    probe: dict[str, np.ndarray] | None = None  # the policy's (T, B) records, e.g. DiCache's error and decision
    labels: dict[str, tuple[str, ...]] | None = None  # names of the codes in coded records

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        return {
            block_list: {
                unit: {"computed": int((status == COMPUTED).sum()), "reused": int((status == REUSED).sum())}
                for unit, status in units.items()
            }
            for block_list, units in self.unit_status.items()
        }

    def to_dict(self) -> dict:
        return {
            "steps": [_STEP_NAMES[int(s)] for s in self.step_status],
            **({"probe": _records_dict(self.probe, self.labels or {})} if self.probe is not None else {}),
            "steps_computed": int((self.step_status == COMPUTED).sum()),
            "steps_step_cached": int((self.step_status == REUSED).sum()),
            "module_counts": self.counts(),
            # One string per step, one character per layer: 'C' computed, 'R' reused, '-' not executed.
            "modules": {
                block_list: {
                    unit: ["".join("-CR"[v + 1] for v in row) for row in status] for unit, status in units.items()
                }
                for block_list, units in self.unit_status.items()
            },
        }


def _records_dict(records: dict[str, np.ndarray], labels: dict[str, tuple[str, ...]]) -> dict:
    def numbers(array):  # JSON has no NaN: "not measured" is null
        return [[None if np.isnan(v) else float(v) for v in row] for row in array]

    def names(array, label):
        return [[label[v] if v >= 0 else "not_run" for v in row] for row in array]

    return {key: names(array, labels[key]) if key in labels else numbers(array) for key, array in records.items()}


@dataclass
class EngineSummary:
    """Returned by :func:`invardiff.summary`: the record of the current or last run."""

    policy: dict
    num_steps: int
    branches: dict[str, BranchSummary]
    cache_bytes: int
    peak_cache_bytes: int
    all_outputs_bytes: int  # one step's unit outputs plus H, i.e. what storing every module output would take

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "num_steps": self.num_steps,
            "cache_bytes": self.cache_bytes,
            "peak_cache_bytes": self.peak_cache_bytes,
            "all_outputs_bytes": self.all_outputs_bytes,
            "branches": {name: branch.to_dict() for name, branch in self.branches.items()},
        }


def summarize(engine) -> EngineSummary:
    branches = {}
    for name, state in engine.branches.items():
        unit_status: dict[str, dict[str, np.ndarray]] = {}
        for index, unit in enumerate(engine.units):
            per_unit = unit_status.setdefault(unit.block_list, {})
            if unit.name not in per_unit:
                num_layers = 1 + max(u.layer for u in engine.units if u.block_list == unit.block_list)
                per_unit[unit.name] = np.full((state.num_steps, num_layers), NOT_RUN, np.int8)
            per_unit[unit.name][:, unit.layer] = state.unit_status[:, index]
        records = engine.policy.records(state.policy_state) if state.policy_state is not None else None
        labels = dict(engine.policy.record_labels) if records is not None else None
        branches[name] = BranchSummary(name, state.step_status.copy(), unit_status, records, labels)
    return EngineSummary(
        engine.policy.describe(),
        engine.policy.num_steps,
        branches,
        engine.cache_bytes,
        engine.peak_cache_bytes,
        engine.all_outputs_bytes,
    )
