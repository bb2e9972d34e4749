"""The two probe policies, registered with the engine's policy registry.

Their static lists (``step_cached`` ...) are what the engine's hooks read for the plan part; the probe part is
``full_reason(step)``: a reason to compute the step without asking the probe, or ``None`` to let it decide.
"""

from __future__ import annotations

import dataclasses

from ..engine.engine import EngineError
from ..engine.policy import CachePolicy, PlanPolicy, check_plan_fits, register_policy
from ..families import FamilySpec
from .config import DiCacheConfig, PlanProbeConfig


class DiCachePolicy(CachePolicy):
    name = "dicache"
    reuse = "extrapolate"
    uses_units = False  # no layer-wise reuse: unit hooks are not installed

    def __init__(self, config: DiCacheConfig):
        self.config = config
        self.num_steps = None
        if config.num_inference_steps is not None:
            self._set_steps(config.num_inference_steps)

    def _set_steps(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.step_cached = [False] * num_steps
        self.keep_hidden_after = [False] * num_steps
        self.unit_reuse, self.unit_keep_after = [], []

    def check_num_steps(self, num_steps: int) -> None:
        fixed = self.config.num_inference_steps
        if fixed is not None and num_steps != fixed:
            raise EngineError(
                f"The pipeline runs {num_steps} steps but the DiCache config says num_inference_steps={fixed}; "
                f"pass num_inference_steps={fixed} to the pipeline, or leave num_inference_steps unset in the "
                f"config to follow the scheduler."
            )
        self._set_steps(num_steps)

    def full_reason(self, step: int) -> str | None:
        if self.config.is_warmup(step, self.num_steps):
            return "warmup"
        if self.config.is_forced(step, self.num_steps):
            return "last_step"
        return None

    def describe(self) -> dict:
        return {"policy": self.name, **dataclasses.asdict(self.config)}


class PlanProbePolicy(PlanPolicy):
    name = "plan+probe"
    reuse = "plan"

    def __init__(self, config: PlanProbeConfig, units):
        super().__init__(config.plan, units)
        self.config = config

    def full_reason(self, step: int) -> str | None:
        return None if self.step_cached[step] else "plan_compute"

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
