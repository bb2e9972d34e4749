"""The two probe policies, registered with the engine's policy registry: DiCache and plan+probe."""

from __future__ import annotations

import dataclasses

from ..engine.engine import EngineError
from ..engine.policy import StepAction, register_policy
from ..engine.state import put_rows
from ..families import FamilySpec
from ..policies.plan import PlanPolicy, check_plan_fits
from .config import DiCacheConfig, PlanProbeConfig
from .probe import ProbePolicy


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

    def begin_step(self, state) -> StepAction:
        self.check_call(state)
        return StepAction.PROBE

    def full_reason(self, step: int) -> str | None:
        if self.config.is_warmup(step, self.num_steps):
            return "warmup"
        if self.config.is_forced(step, self.num_steps):
            return "last_step"
        return None

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

    def full_reason(self, step: int) -> str | None:
        return None if self.step_cached[step] else "plan_compute"

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

    def describe(self) -> dict:
        settings = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config) if f.name != "plan"}
        return {"policy": self.name, "provenance": self.plan.provenance, **settings}


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
