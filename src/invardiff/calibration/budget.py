"""``calibrate_budget``: record calibration trajectories on a pipeline, then search plans at FLOP-ideal budgets."""

from __future__ import annotations

from dataclasses import replace

from ..families import resolve_family
from ..flops import profile_flops
from .batching import pipeline_call_config
from .run import _default_kwargs
from .search import SearchConfig, SearchResult, pareto_plans
from .trajectory import TrajectoryStats, record_trajectories


def calibrate_budget(
    pipe,
    *,
    num_inference_steps: int,
    cases: list[tuple],
    speedups: list[float],
    search: SearchConfig | None = None,
    window: int = 6,
    batch_size: int | None = None,
    pipeline_kwargs: dict | None = None,
) -> tuple[list[SearchResult], TrajectoryStats]:
    """Plans of least calibration-set error at each FLOP-ideal speedup in ``speedups`` (one per target).

    One full-compute pass over ``cases`` (``[(prompt or class id, seed), ...]``) records the trajectories
    (:func:`record_trajectories`); the FLOPs come from the transformer at the calibration call's shapes
    (:func:`invardiff.flops.profile_flops`); :func:`invardiff.calibration.search.search_plan` does the rest for
    each target. ``search`` sets everything but the speedup (default: no extrapolation, unit reuse on).
    ``window`` bounds the longest reuse run (and the features held per stream while recording).

    Returns the results (targets out of reach are skipped with a warning) and the trajectory statistics, from
    which more plans can be searched without the model.
    """
    stats = record_trajectories(
        pipe,
        num_inference_steps=num_inference_steps,
        cases=cases,
        window=window,
        batch_size=batch_size,
        pipeline_kwargs=pipeline_kwargs,
    )
    family = resolve_family(pipe.transformer).name
    call_kwargs = {"num_inference_steps": num_inference_steps, **_default_kwargs(family), **(pipeline_kwargs or {})}
    flops = profile_flops(pipeline_call_config(pipe, family, call_kwargs))
    config = search or SearchConfig(speedup=max(speedups))
    results = pareto_plans(stats, flops, speedups, replace(config, speedup=max(speedups)))
    return results, stats
