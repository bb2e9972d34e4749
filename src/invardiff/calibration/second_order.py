"""Second-order refit of a searched plan's reused steps (plan format version 4).

The verified selection and the descent on sampled error (``calibration/budget.py``) choose a schedule among many
candidates by their sampled error on a handful of calibration runs; with second-order candidates among them the
choice fitted those runs and held out worse (dit-digits at 4x, 12 evaluation images: 37.5 dB against 40.5 for the
first-order choice refitted at second order, ``benchmarks/results/frontier/README.md``). So ``step_order=2`` keeps the
selection at first order and refits only its result: every reused step whose three last computed steps lie inside
the recorded window gets the least-squares ``(c1, c2)`` of :meth:`TrajectoryStats.fit_second_order`, as far as the
FLOP budget leaves room for the second lerp (the steps of largest modelled gain per added lerp first), and the caller
keeps the refit only where it samples closer to full compute than the first-order plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..stats import ideal_speedup, plan_flops
from .result import SearchResult
from .trajectory import STEP_STREAM, TrajectoryStats


def second_order_refit(stats: TrajectoryStats, flops, result: SearchResult, speedup: float) -> SearchResult | None:
    """``result``'s plan with reused steps refitted at second order where the window holds their three last computed
    steps, while its FLOP-ideal speedup stays at least ``speedup``; the computed steps and units are unchanged, and
    the step error is re-rated. None when no step gains or the budget leaves room for none."""
    plan = result.plan
    T = plan.num_inference_steps
    computed = np.flatnonzero(~plan.step_cache)
    first = plan.step_extrapolation if plan.step_extrapolation is not None else np.zeros(T)
    lerp = flops.extrapolation_flops(flops.step_elements)
    candidates = []  # (gain per added lerp, step, c1, c2, relative error change, lerps added)
    for t in np.flatnonzero(plan.step_cache):
        earlier = computed[computed < t][::-1]
        if len(earlier) < 3 or t - earlier[2] > stats.window:
            continue
        q, p, a = int(earlier[2]), int(earlier[1]), int(earlier[0])
        c1, c2, squared = stats.fit_second_order(STEP_STREAM, q, p, a, t)
        before = stats.fit(STEP_STREAM, p, a, t)[1] if first[t] != 0 else stats.reuse_error(STEP_STREAM, a, t)
        if c2 == 0.0 or squared >= before:
            continue
        added = 1 if first[t] != 0 else 2
        change = stats.relative(STEP_STREAM, squared, t) - stats.relative(STEP_STREAM, before, t)
        candidates.append(((before - squared) / added, int(t), c1, c2, change, added))
    slack = T * flops.full_step / speedup - plan_flops(plan, flops)
    steps, second = first.copy(), np.zeros(T)
    change = 0.0
    for _, t, c1, c2, delta, added in sorted(candidates, reverse=True):
        if added * lerp > slack:
            continue
        slack -= added * lerp
        steps[t], second[t] = c1, c2
        change += delta
    if not second.any():
        return None
    refit = dataclasses.replace(
        plan,
        step_extrapolation=steps,
        step_extrapolation2=second,
        provenance={**plan.provenance, "search": dict(plan.provenance["search"])},
    )
    refit.provenance["search"]["second_order"] = {"steps": int((second != 0).sum()), "window": stats.window}
    speedup_now = ideal_speedup(refit, flops)
    return SearchResult(refit, result.error + change, result.step_error + change, result.unit_error, speedup_now)
