"""The two probe policies, registered with the engine's policy registry: DiCache and plan+probe."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..engine.engine import DEFAULT_BRANCH, EngineError
from ..engine.policy import StepAction, register_policy
from ..engine.state import put_rows, take_rows
from ..families import FamilySpec
from ..policies.plan import PlanPolicy, check_plan_fits
from .config import CALL_ORDER, DiCacheConfig, PlanProbeConfig
from .probe import ProbeBranch, ProbePolicy


class DiCachePolicy(ProbePolicy):
    """Every step runs the probe; skipped samples get their residual extrapolated (SPEC.md Part B)."""

    name = "dicache"
    reuse = "extrapolate"

    def __init__(self, config: DiCacheConfig):
        super().__init__(config)
        self.num_steps = config.num_inference_steps

    def start_run(self, num_steps: int) -> None:
        fixed = self.config.num_inference_steps
        if fixed is not None and num_steps != fixed:
            raise EngineError(
                f"The pipeline runs {num_steps} steps but the DiCache config says num_inference_steps={fixed}; "
                f"pass num_inference_steps={fixed} to the pipeline, or leave num_inference_steps unset in the "
                f"config to follow the scheduler."
            )
        self.num_steps = num_steps

    def steps_needed(self) -> int | None:
        return self.config.num_inference_steps

    def new_branch(self, state) -> ProbeBranch:
        branch = super().new_branch(state)
        # Which samples warm up at which step: by their branch's official counter (WAN counts calls, so in a call
        # holding both branches the conditional samples may warm up one step longer than the unconditional ones).
        rows = _row_branches(self.config, state.name, branch.batch)
        table = np.array(
            [[self.config.is_warmup(k, self.num_steps, name) for name in rows] for k in range(state.num_steps)]
        )
        branch.warmup = table
        mixed = table.any(axis=1) & ~table.all(axis=1)
        # One host-to-device copy per run, and only when some step warms up part of the batch.
        branch.warmup_device = torch.as_tensor(table, device=state.call.device) if mixed.any() else None
        return branch

    def begin_step(self, state) -> StepAction:
        self.check_call(state)
        return StepAction.PROBE

    def full_reason(self, state) -> str | None:
        if state.policy_state.warmup[state.step].all():
            return "warmup"
        if self.config.is_forced(state.step, self.num_steps):
            return "last_step"
        return None

    def warmup_rows(self, state):
        branch = state.policy_state
        rows = branch.warmup[state.step]
        return (rows, branch.warmup_device[state.step]) if rows.any() else None

    def head_input(self, state, hidden):
        return self.assemble(state, hidden), None

    def describe(self) -> dict:
        return {"policy": self.name, **dataclasses.asdict(self.config)}


class PlanProbePolicy(ProbePolicy, PlanPolicy):
    """The plan's compute steps run as planned (the probe output is recorded for free); on a step the plan
    step-caches the probe runs and vetoes the reuse, per sample, when its accumulated change reaches delta."""

    name = "plan+probe"
    reuse = "plan"

    def __init__(self, config: PlanProbeConfig, units):
        PlanPolicy.__init__(self, config.plan, units)
        ProbePolicy.__init__(self, config)

    def begin_step(self, state) -> StepAction:
        self.check_call(state)
        return StepAction.PROBE if self.step_cached[state.step] else StepAction.COMPUTE

    def full_reason(self, state) -> str | None:
        return None if self.step_cached[state.step] else "plan_compute"

    def unit_to_keep(self, state, unit: int, output):
        if not self.step_cached[state.step]:
            return PlanPolicy.unit_to_keep(self, state, unit, output)
        # The probe vetoed the plan's reuse of this step, so the unit ran (maybe on some samples only). A later
        # step may still reuse this unit's cache: refresh it, never drop it.
        cached = state.units[unit]
        if cached is None:
            return None
        return output if state.compute_rows is None else put_rows(cached, state.compute_rows, output)

    def head_input(self, state, hidden):
        hidden = self.assemble(state, hidden)
        return hidden, self._kept_hidden(state, hidden)

    def _kept_hidden(self, state, hidden):
        if not self.step_cached[state.step] or state.skip_all or not self.keep_hidden_after[state.step]:
            return super()._kept_hidden(state, hidden)  # ProbePolicy keeps nothing of its own: the plan's rule
        # The probe vetoed the plan's reuse of this step for some samples (all: compute_rows is None), so they ran
        # it: their H replaces the kept one, as a computed step's would. A later reuse then starts from the state
        # the probe's accumulator was reset at, not from the plan's older anchor.
        if state.compute_rows is None:
            return hidden
        return put_rows(state.hidden, state.compute_rows, take_rows(hidden, state.compute_rows))

    def describe(self) -> dict:
        settings = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config) if f.name != "plan"}
        return {"policy": self.name, "provenance": self.plan.provenance, **settings}


def _row_branches(config: DiCacheConfig, name: str, batch: int) -> list[str]:
    """The CFG branch of each sample of a call on the engine branch ``name``, as the warm-up counts them."""
    parts = config.batch_branches
    if name in CALL_ORDER:
        if parts is not None:
            raise EngineError(
                f"DiCache batch_branches={parts} describes a call that holds several CFG branches, but this call "
                f"runs in cache_context {name!r}, one branch. Leave batch_branches unset for pipelines that call "
                f"each branch separately."
            )
        return [name] * batch
    if config.warmup_counter == "calls" and name != DEFAULT_BRANCH:
        raise EngineError(
            f"DiCache with warmup_counter='calls' counts the official calls of each step in the order {CALL_ORDER}; "
            f"this call runs in cache_context {name!r}. Name the branches {CALL_ORDER}, or use "
            f"warmup_counter='steps'."
        )
    if parts is None:
        return ["cond"] * batch
    if batch % len(parts):
        raise EngineError(
            f"DiCache batch_branches={parts} splits the batch into {len(parts)} equal parts, but this call has "
            f"{batch} samples. Give the call {len(parts)} equal parts, one per branch, or fix batch_branches."
        )
    return [name for name in parts for _ in range(batch // len(parts))]


def _check_probe_depth(depth: int, family: FamilySpec, transformer) -> None:
    layers = family.num_layers(transformer)
    first = family.block_lists[0].attr
    total = sum(layers.values())
    if depth > layers[first] or depth >= total:
        raise ValueError(
            f"probe_depth={depth} does not fit {type(transformer).__name__}: the probe is the first blocks of "
            f"{first!r} ({layers[first]} blocks) and at least one block must remain after it ({total} in all); "
            f"use 1 <= probe_depth <= {min(layers[first], total - 1)} (the official default is 1)."
        )


@register_policy(DiCacheConfig)
def _build_dicache_policy(config: DiCacheConfig, family: FamilySpec, transformer, units) -> DiCachePolicy:
    _check_probe_depth(config.probe_depth, family, transformer)
    return DiCachePolicy(config)


@register_policy(PlanProbeConfig)
def _build_plan_probe_policy(config: PlanProbeConfig, family: FamilySpec, transformer, units) -> PlanProbePolicy:
    _check_probe_depth(config.probe_depth, family, transformer)
    check_plan_fits(config.plan, family, transformer)
    return PlanProbePolicy(config, units)
