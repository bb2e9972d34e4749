"""Transforms of a finished plan: explicit, recorded deviations from what calibration produced."""

from __future__ import annotations

import numpy as np

from .plan import CachePlan


def cap_step_runs(plan: CachePlan, max_run: int) -> CachePlan:
    """A copy of ``plan`` in which at most ``max_run`` consecutive steps are step-cached.

    Every run of step-cached steps longer than ``max_run`` gets a computed step after each ``max_run`` reused
    ones (MagCache's ``max_skip_steps`` K, cache-dit's ``max_continuous_cached_steps``). The forced steps compute
    every module. Each forced step costs one step of compute and refreshes H, so long state reuse (up to 7 steps in
    the official FLUX Fast book) cannot drift as far. The cap is recorded in the plan's provenance.
    """
    if not isinstance(max_run, int) or max_run < 1:
        raise ValueError(f"max_run must be an integer >= 1 (consecutive step-cached steps), got {max_run!r}.")
    step_cache = plan.step_cache.copy()
    run = 0
    for step, cached in enumerate(step_cache):
        run = run + 1 if cached else 0
        if run > max_run:
            step_cache[step], run = False, 0
    forced = plan.step_cache & ~step_cache
    module_reuse = {
        name: {kind: np.where(forced[:, None], False, matrix) for kind, matrix in kinds.items()}
        for name, kinds in plan.module_reuse.items()
    }
    provenance = {**plan.provenance, "max_step_run": max_run}
    return CachePlan(plan.model, plan.num_inference_steps, step_cache, module_reuse, plan.scheduler, provenance)
