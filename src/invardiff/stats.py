"""Plan statistics: how much a plan reuses, and the speedup its FLOPs allow on a given model config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .families import get_family
from .plan import CachePlan


@dataclass(frozen=True)
class KindStats:
    block_list: str
    kind: str
    reuse_fraction: float  # over all T x L entries, step-cached rows included (SPEC.md A.7 "raw")
    reuse_fraction_outside_step_cache: float  # over the rows that actually execute
    reused_steps_outside_step_cache: list[int]  # executed steps where at least one layer reuses


def unit_reuse(plan: CachePlan, block_list: str) -> dict[str, np.ndarray]:
    """Effective ``(T, L)`` reuse of each executable unit: the AND of the kinds that control it."""
    return get_family(plan.model.family).block_list(block_list).unit_reuse(plan.module_reuse[block_list])


def kind_stats(plan: CachePlan) -> list[KindStats]:
    executed = ~plan.step_cache
    stats = []
    for facts in plan.model.block_lists:
        for kind in facts.module_kinds:
            matrix = plan.module_reuse[facts.name][kind]
            outside = matrix[executed]
            reused_steps = np.flatnonzero(executed & matrix.any(axis=1)).tolist()
            stats.append(
                KindStats(
                    facts.name,
                    kind,
                    float(matrix.mean()),
                    float(outside.mean()) if outside.size else 0.0,
                    reused_steps,
                )
            )
    return stats


def plan_summary(plan: CachePlan, flops=None) -> dict:
    """Machine-readable statistics of a plan; with a :class:`FlopProfile`, also the ideal speedup."""
    modules = {}
    for stat in kind_stats(plan):
        key = stat.kind if len(plan.model.block_lists) == 1 else f"{stat.block_list}.{stat.kind}"
        modules[key] = {
            "reuse_fraction": stat.reuse_fraction,
            "reuse_fraction_outside_step_cache": stat.reuse_fraction_outside_step_cache,
            "reused_steps_outside_step_cache": stat.reused_steps_outside_step_cache,
        }
    result = {
        "family": plan.model.family,
        "num_steps": plan.num_inference_steps,
        "steps_reused": int(plan.step_cache.sum()),
        "step_cached_indices": np.flatnonzero(plan.step_cache).tolist(),
        "modules": modules,
    }
    if plan.extrapolates:
        result["extrapolated_entries"] = extrapolation_work(plan, flops)
    if flops is not None:
        result["model_config"] = flops.config_name
        result["ideal_speedup"] = ideal_speedup(plan, flops)
        result["compute_fraction"] = 1.0 / result["ideal_speedup"]
    return result


def plan_flops(plan: CachePlan, flops) -> float:
    """FLOPs the plan executes over all steps on the profiled config (one CFG branch or batched call), the
    arithmetic of its extrapolated reuses included (:func:`extrapolation_work`)."""
    flops.check_plan(plan)
    total = 0.0
    for t in range(plan.num_inference_steps):
        if plan.step_cache[t]:
            total += flops.step_cached
            continue
        total += flops.full_step
        for facts in plan.model.block_lists:
            for unit, reuse in unit_reuse(plan, facts.name).items():
                total -= float(np.dot(reuse[t], flops.units[facts.name][unit]))
    return total + extrapolation_work(plan, flops)["flops"]


def extrapolation_work(plan: CachePlan, flops=None) -> dict:
    """What a plan's extrapolation adds to a run: how many reused entries extrapolate (step-cached steps, and unit
    reuses at executed steps, with a nonzero coefficient) and, with a :class:`FlopProfile` that records the stream
    sizes, their FLOPs (one lerp each, two for a second-order step; :data:`invardiff.flops.LERP_FLOPS` per
    element and lerp)."""
    orders = plan.step_extrapolation_order() * plan.step_cache  # a second-order reuse is two lerps
    work = {"steps": int((orders > 0).sum()), "units": 0, "flops": 0.0}
    if (orders == 2).any():
        work["second_order_steps"] = int((orders == 2).sum())
    if flops is not None:
        work["flops"] += int(orders.sum()) * flops.extrapolation_flops(flops.step_elements)
    if plan.unit_extrapolation is None:
        return work
    executed = ~plan.step_cache
    for facts in plan.model.block_lists:
        for unit, reuse in unit_reuse(plan, facts.name).items():
            extrapolated = reuse & executed[:, None] & (plan.unit_extrapolation[facts.name][unit] != 0)  # (T, L)
            work["units"] += int(extrapolated.sum())
            sizes = flops.unit_elements.get(facts.name, {}).get(unit) if flops is not None else None
            if sizes is not None:
                work["flops"] += flops.extrapolation_flops(float(extrapolated.sum(axis=0) @ sizes))
    return work


def ideal_speedup(plan: CachePlan, flops) -> float:
    """Full-compute FLOPs over the plan's FLOPs: the speedup if time were proportional to FLOPs."""
    return plan.num_inference_steps * flops.full_step / plan_flops(plan, flops)
