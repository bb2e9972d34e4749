"""Transforms of a finished plan: explicit, recorded deviations from what calibration produced."""

from __future__ import annotations

import math

import numpy as np

from .plan import CachePlan


# The most steps a plan is resampled to. Every supported family's scheduler is defined on 1000 training timesteps
# (num_train_timesteps=1000): DDIM / DDPM (DiT) refuse more inference steps than that, and a flow-matching or UniPC
# sampler given more steps only subdivides the grid the model was trained on (the official step counts are 28-250).
# Without a bound, 10,000,000 steps ran for minutes and gigabytes before writing anything.
MAX_RESAMPLE_STEPS = 1000


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
    return CachePlan(
        plan.model,
        plan.num_inference_steps,
        step_cache,
        module_reuse,
        plan.scheduler,
        provenance,
        cache_dtype=plan.cache_dtype,
    )


def resample_plan(
    plan: CachePlan,
    num_steps: int,
    source_times: np.ndarray | None = None,
    target_times: np.ndarray | None = None,
) -> CachePlan:
    """A copy of ``plan`` for ``num_steps`` sampling steps, defined on the sampler's time axis.

    Each new step ``j`` sits at its position on the time axis: ``source_times`` / ``target_times`` are the two
    schedules (timesteps or sigmas of the plan's step count and of ``num_steps``), normalised to [0, 1]; without
    them, positions are ``i / (T - 1)``, which is the time axis of every schedule that warps one uniform grid
    the same way whatever the step count (flow matching with a fixed shift, DDIM's linear or trailing spacing).

    * Steps: the step-cache bits are interpolated along the axis and the ``round(f * num_steps)`` steps with the
      highest values are reused (``f``: the plan's reuse fraction), so the fraction is kept within one step; the
      warm-up (``max(1, floor(nonskip_rate * num_steps))`` of a calibrated plan, the scaled ``warmup_steps`` of a
      searched plan, else step 0) and the last step compute.
    * Modules: each new row takes the nearest old row; forced and orphaned reuses (no earlier computed output)
      compute.
    * Extrapolation coefficients are dropped (they were fitted for the old gaps): recalibrate to get them back.

    Trade-off: no calibration run, but the reuse decisions are those of another step count; recalibrating at
    ``num_steps`` measures the new trajectory (see the README's resampling figures).
    """
    if not isinstance(num_steps, int) or not 3 <= num_steps <= MAX_RESAMPLE_STEPS:
        raise ValueError(
            f"num_steps must be an integer from 3 to {MAX_RESAMPLE_STEPS} (the schedulers' 1000 training timesteps), "
            f"got {num_steps!r}."
        )
    T = plan.num_inference_steps
    source = _positions(source_times, T, "source_times")
    target = _positions(target_times, num_steps, "target_times")
    warmup = _warmup(plan, num_steps)
    values = np.interp(target, source, plan.step_cache.astype(np.float64))
    wanted = round(float(plan.step_cache.mean()) * num_steps)
    candidates = [j for j in range(warmup, num_steps - 1)]
    # Highest interpolated values first; ties go to the nearest old step being reused, then to later steps.
    nearest = np.abs(target[:, None] - source[None, :]).argmin(axis=1)
    order = sorted(candidates, key=lambda j: (-values[j], not plan.step_cache[nearest[j]], -j))
    step_cache = np.zeros(num_steps, dtype=bool)
    step_cache[order[:wanted]] = True
    executed = ~step_cache
    module_reuse = {}
    for name, kinds in plan.module_reuse.items():
        module_reuse[name] = {}
        for kind, matrix in kinds.items():
            rows = matrix[nearest].copy()
            rows[:warmup] = False
            rows[-1] = False
            rows[step_cache] = True  # never executed (official books mark them reused)
            module_reuse[name][kind] = rows & ~_orphans(rows, executed)
    provenance = {
        **plan.provenance,
        "resampled_from": {"num_steps": T, "axis": "index" if source_times is None else "schedule"},
    }
    return CachePlan(
        plan.model, num_steps, step_cache, module_reuse, plan.scheduler, provenance, cache_dtype=plan.cache_dtype
    )


def _positions(times, count: int, name: str) -> np.ndarray:
    if times is None:
        return np.linspace(0.0, 1.0, count)
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (count,) or count < 2 or not np.isfinite(times).all():
        raise ValueError(f"{name} must be {count} finite timesteps (one per step), got shape {times.shape}.")
    span = times[-1] - times[0]
    if span == 0 or not (np.all(np.diff(times) * np.sign(span) > 0)):
        raise ValueError(f"{name} must be strictly monotonic (a sampler's schedule), got {times[:4]}...")
    return (times - times[0]) / span


def _warmup(plan: CachePlan, num_steps: int) -> int:
    """Leading steps that compute everything: from the provenance of calibrated or searched plans, else step 0."""
    provenance = plan.provenance if isinstance(plan.provenance, dict) else {}
    rate = (provenance.get("thresholds") or {}).get("nonskip_rate")
    if isinstance(rate, (int, float)):
        return max(1, math.floor(rate * num_steps))
    searched = (provenance.get("search") or {}).get("warmup_steps")
    if isinstance(searched, int):
        return max(1, round(searched * num_steps / plan.num_inference_steps))
    return 1


def _orphans(rows: np.ndarray, executed: np.ndarray) -> np.ndarray:
    # A reuse on an executed step with no computed output of that module at an earlier executed step.
    orphan = np.zeros_like(rows)
    computed_before = np.zeros(rows.shape[1], dtype=bool)
    for t in np.flatnonzero(executed):
        orphan[t] = rows[t] & ~computed_before
        computed_before |= ~rows[t] | orphan[t]
    return orphan
