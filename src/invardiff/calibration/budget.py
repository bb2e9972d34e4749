"""``calibrate_budget``: record calibration trajectories on a pipeline, then search plans at FLOP-ideal budgets.

The search's error model adds up per-step errors measured on full-compute trajectories; it cannot see how an early
error grows through the later steps, so it favours long runs of reused steps that sampling punishes. With
``verify=True`` each target is searched under several caps on consecutive reused steps (:data:`VERIFY_MAX_RUNS`),
each with and without unit reuse (:data:`VERIFY_UNIT_REUSE`: the additive model underrates how a reused unit's
error grows through the later layers and steps, and at 4x and beyond it spends the budget on unit reuse that
sampling punishes), and every distinct candidate is sampled on the calibration inputs: the plan whose outputs come
closest to full compute's (mean squared error) is kept. Cost: one full-compute pass plus one pass per distinct
candidate (at most six per target) over the calibration inputs, on top of the recording pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch

from ..families import resolve_family
from ..flops import profile_flops
from .batching import pipeline_call_config
from .run import _call, check_cases, output_tensor, sampling_defaults
from .search import BudgetError, SearchConfig, SearchResult, pareto_plans, search_plan
from .trajectory import TrajectoryStats, record_trajectories


logger = logging.getLogger(__name__)

# The caps on consecutive reused steps tried per target by verify=True (None: the trajectories' window).
VERIFY_MAX_RUNS = (2, 3, None)
# Unit reuse on / off per cap (off: the budget is met by step reuse alone); a config without unit reuse tries off.
VERIFY_UNIT_REUSE = (True, False)


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
    verify: bool = False,
) -> tuple[list[SearchResult], TrajectoryStats]:
    """Plans of least calibration-set error at each FLOP-ideal speedup in ``speedups`` (one per target).

    One full-compute pass over ``cases`` (``[(prompt or class id, seed or latents), ...]``, as in
    :func:`~invardiff.calibration.calibrate`) records the trajectories
    (:func:`record_trajectories`); the FLOPs come from the transformer at the calibration call's shapes
    (:func:`invardiff.flops.profile_flops`); :func:`invardiff.calibration.search.search_plan` does the rest for
    each target. ``search`` sets everything but the speedup (default: no extrapolation, unit reuse on).
    ``window`` bounds the longest reuse run (and the features held per stream while recording). The calls run at
    the pipeline's default guidance scale unless ``pipeline_kwargs`` sets one (:func:`sampling_defaults`).

    ``verify``: choose each target's plan among the searches under the caps of :data:`VERIFY_MAX_RUNS`, with and
    without unit reuse, by the sampled outputs' error on the calibration inputs (see the module docstring;
    ``search.max_run`` is then ignored). Slower calibration (up to 6 sampling passes per target), plans that hold
    up better at high speedups.

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
    call_kwargs = {
        "num_inference_steps": num_inference_steps,
        **sampling_defaults(pipe, family),
        **(pipeline_kwargs or {}),
    }
    flops = profile_flops(pipeline_call_config(pipe, family, call_kwargs))
    config = replace(search or SearchConfig(speedup=max(speedups)), speedup=max(speedups))
    if not verify:
        return pareto_plans(stats, flops, speedups, config), stats
    return verified_plans(pipe, stats, flops, speedups, config, cases, call_kwargs, batch_size), stats


def verified_plans(
    pipe, stats, flops, speedups, config: SearchConfig, cases, call_kwargs: dict, batch_size: int | None = None
) -> list[SearchResult]:
    """``calibrate_budget(verify=True)``'s selection on trajectories already recorded: per target in
    ``speedups``, the searched plan (one per setting of :func:`verify_grid`) whose outputs on ``cases`` sampled
    with ``call_kwargs`` come closest to full compute's. Targets no cap reaches are skipped with a warning."""
    family = resolve_family(pipe.transformer).name
    cases = check_cases(cases)

    def sample() -> torch.Tensor:
        return _outputs(pipe, family, cases, call_kwargs, batch_size or len(cases))

    reference = sample()
    results = []
    for speedup in speedups:
        chosen = _verified(stats, flops, replace(config, speedup=float(speedup)), pipe, sample, reference)
        if chosen is not None:
            results.append(chosen)
    return results


def _verified(stats, flops, config: SearchConfig, pipe, sample, reference: torch.Tensor) -> SearchResult | None:
    """The candidate of least output error at ``config.speedup``, its plan's provenance recording every
    candidate's error; None (with a warning) when no cap reaches the target."""
    from .. import api

    candidates, errors = [], []
    for max_run, units in verify_grid(config):
        try:
            result = search_plan(stats, flops, replace(config, max_run=max_run, reuse_units=units))
        except BudgetError as error:
            logger.info("%.3gx with runs of at most %s: %s", config.speedup, max_run or "window", error)
            continue
        if any(_same_plan(result.plan, other.plan) for other in candidates):
            continue  # a cap the plan never reaches gives the same plan
        with api.enabled(pipe, result.plan):
            output = sample()
        candidates.append(result)
        error = float(((output - reference) ** 2).mean())
        errors.append(error if math.isfinite(error) else math.inf)  # a plan that turns the output NaN loses
    if not candidates:
        logger.warning("skipping %.3gx: no cap on reused runs reaches it", config.speedup)
        return None
    best = int(np.argmin(errors))
    chosen = candidates[best]
    chosen.plan.provenance["search"]["verified"] = {
        "output_mse": errors[best],
        "candidates": [
            {
                "max_run": c.plan.provenance["search"]["max_run"],
                "reuse_units": c.plan.provenance["search"]["reuse_units"],
                "output_mse": e,
                "model_error": c.error,
            }
            for c, e in zip(candidates, errors, strict=True)
        ],
    }
    search = chosen.plan.provenance["search"]
    logger.info(
        "%.3gx: kept the plan with runs of at most %d, unit reuse %s",
        config.speedup,
        search["max_run"],
        "on" if search["reuse_units"] else "off",
    )
    return chosen


def verify_grid(config: SearchConfig) -> list[tuple]:
    """The (max_run, reuse_units) settings whose searched plans the verified selection samples."""
    units = [u for u in VERIFY_UNIT_REUSE if config.reuse_units or not u]
    return [(max_run, reuse) for reuse in units for max_run in VERIFY_MAX_RUNS]


def _same_plan(a, b) -> bool:
    """Same decisions (the extrapolation coefficients follow from them)."""
    first, second = a.to_dict(), b.to_dict()
    return all(first[key] == second[key] for key in ("step_cache", "module_reuse"))


def _outputs(pipe, family: str, cases: list[tuple], call_kwargs: dict, batch_size: int) -> torch.Tensor:
    """The pipeline's outputs for ``cases`` (every output as float32, concatenated over the batches)."""
    outputs = [
        output_tensor(_call(pipe, family, cases[start : start + batch_size], call_kwargs)).float().cpu()
        for start in range(0, len(cases), batch_size)
    ]
    return torch.cat(outputs)
