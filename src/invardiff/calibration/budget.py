"""``calibrate_budget``: record calibration trajectories on a pipeline, then search plans at FLOP-ideal budgets.

The search's error model adds up per-step errors measured on full-compute trajectories; it cannot see how an early
error grows through the later steps, so it favours long runs of reused steps that sampling punishes. With
``verify=True`` each target is searched under several caps on consecutive reused steps (:data:`VERIFY_MAX_RUNS`),
each with unit reuse on the computed steps, at the last step only, and without (:data:`VERIFY_UNIT_REUSE`: the
additive model underrates how a reused unit's error grows through the later layers and steps, and at 4x and beyond
it spends the budget on unit reuse that sampling punishes), a search that extrapolates also without extrapolation
(:func:`verify_grid`), and every distinct candidate is sampled on the calibration inputs: the plan whose outputs come
closest to full compute's (mean squared error) is kept. Cost: one full-compute pass plus one pass per distinct
candidate (at most fifteen per target, thirty with extrapolation) over the calibration inputs, on top of the
recording pass.

The caps of 4 and 5 are there for the high targets (4.5x-5x): a cap of 3 cannot reach them, and the window alone
(6) leaves runs of 6-7 reused steps that sampling punishes; at 5x on dit-digits (50 steps) the cap of 4 with
extrapolated unit reuse is the candidate of least sampled error (calibration MSE 0.00040 against 0.00085 for the
window's), and flux-shapes (28 steps) reaches 5x with 6 computed steps under a cap of 5 instead of 5 computed
steps (5.6x, overshooting the budget) under the window.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch

from ..families import resolve_family
from ..flops import profile_flops
from ..policies.plan import STEP_REUSE, PlanConfig
from .batching import pipeline_call_config
from .run import call_pipeline, check_cases, output_tensor, sampling_defaults
from .search import (
    BudgetError,
    SearchConfig,
    SearchResult,
    filled_plan,
    pareto_plans,
    schedule_plan,
    search_plan,
    unit_savings,
)
from .second_order import second_order_refit
from .trajectory import TrajectoryStats, record_trajectories


logger = logging.getLogger(__name__)

# The caps on consecutive reused steps tried per target by verify=True (None: the trajectories' window).
VERIFY_MAX_RUNS = (2, 3, 4, 5, None)
# The farthest one computed step moves in one step of refine's descent (shifts of 1 are tried first).
DESCENT_REACH = 2
# Unit reuse per cap: (reuse_units, last_step_units) = on the computed steps, at the last step only (SearchConfig), or
# off (the budget is met by step reuse alone); a config without unit reuse tries off only.
VERIFY_UNIT_REUSE = ((True, False), (True, True), (False, False))


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
    max_cache_bytes: int | None = None,
    cache_dtype: str | None = None,
    refine: int = 0,
    fit_window: int | None = None,
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
    without unit reuse (and, when ``search`` extrapolates, with and without extrapolation), by the sampled outputs'
    error on the calibration inputs (see the module docstring; ``search.max_run`` is then ignored). Slower
    calibration (up to 15 sampling passes per target, 30 with extrapolation), plans that hold up better at high
    speedups.

    ``refine`` (with ``verify``): then at most this many rounds of a descent on sampled error from each kept plan:
    every computed step moved one step earlier or later (units re-allocated on the new schedule), the first move
    whose sampled error is lower kept (:func:`refined_best`). Up to ``4 * steps computed`` sampling passes a round.

    ``fit_window`` (with ``search.step_order=2``): record this many steps back instead of ``window``; the search, the
    selection and the descent still see ``window`` (:meth:`TrajectoryStats.within`), the second-order refit of their
    plans the whole recording (its third computed step lies up to three gaps back: on dit-digits' 4x plan, 50 steps,
    12 computed, a 20-step recording reaches 32 of its 38 reused steps). Recording holds ``fit_window + 1`` features
    per stream.

    ``max_cache_bytes``: every plan keeps at most this many bytes of cache in a run at the sampling call's shapes
    (:class:`~invardiff.calibration.search.MemoryBound`, measured on the meta device), its values stored as
    ``cache_dtype`` (default: the model's dtype; ``engine/storage.py``).

    Returns the results (targets out of reach are skipped with a warning) and the trajectory statistics, from
    which more plans can be searched without the model.
    """
    if refine and not verify:
        raise ValueError(f"refine={refine} descends on sampled error from verified plans: set verify=True.")
    if refine and (max_cache_bytes is not None or cache_dtype is not None):
        raise NotImplementedError(
            f"refine={refine} moves computed steps without refitting the plan to max_cache_bytes / cache_dtype; "
            "search with one or the other, or fit the refined plan afterwards (invardiff fit-memory)."
        )
    if fit_window is not None and fit_window < window:
        raise ValueError(f"fit_window ({fit_window}) is how far back the refit reads: at least window ({window}).")
    stats = record_trajectories(
        pipe,
        num_inference_steps=num_inference_steps,
        cases=cases,
        window=fit_window or window,
        batch_size=batch_size,
        pipeline_kwargs=pipeline_kwargs,
    )
    family = resolve_family(pipe.transformer).name
    call_kwargs = {
        "num_inference_steps": num_inference_steps,
        **sampling_defaults(pipe, family),
        **(pipeline_kwargs or {}),
    }
    model_config = pipeline_call_config(pipe, family, call_kwargs)
    flops = profile_flops(model_config)
    config = replace(search or SearchConfig(speedup=max(speedups)), speedup=max(speedups))
    if max_cache_bytes is not None or cache_dtype is not None:
        from ..cache_footprint import measure_footprint
        from .search import MemoryBound

        bound = max_cache_bytes if max_cache_bytes is not None else 2**62  # a storage dtype alone: no bound
        config = replace(config, memory=MemoryBound(bound, measure_footprint(model_config), cache_dtype))
    searched = stats.within(window) if fit_window else stats  # the search sees --window; the refit, all
    if not verify:  # no sampling: the refit's lower modelled error decides
        return pareto_plans(searched, flops, speedups, config, refit_stats=stats), stats
    chosen = verified_plans(
        pipe, searched, flops, speedups, config, cases, call_kwargs, batch_size, refine, refit_stats=stats
    )
    return chosen, stats


def verified_plans(
    pipe,
    stats,
    flops,
    speedups,
    config: SearchConfig,
    cases,
    call_kwargs: dict,
    batch_size: int | None = None,
    refine: int = 0,
    step_reuse: str = "state",
    refit_stats: TrajectoryStats | None = None,
) -> list[SearchResult]:
    """``calibrate_budget(verify=True)``'s selection on trajectories already recorded: per target in
    ``speedups``, the searched plan (one per setting of :func:`verify_grid`) whose outputs on ``cases`` sampled
    with ``call_kwargs`` come closest to full compute's. Targets no cap reaches are skipped with a warning.
    ``refine``: rounds of :func:`refined_plan` from the best candidate of each unit setting, the plan of least
    sampled error at the end kept.

    ``step_reuse``: the :class:`~invardiff.policies.plan.PlanConfig` step reuse every candidate is sampled with
    (``"residual"``: a reused step adds the last computed H - x to its own block-stack input), recorded in the
    plans' provenance (``search.step_reuse``) when not ``"state"``; run the plans with the same ``PlanConfig``. The
    search's additive model still rates reused steps on H.

    ``config.step_order=2``: the selection and the descent at first order, then each kept plan's second-order refit
    (:func:`~invardiff.calibration.second_order.second_order_refit` on ``refit_stats``, default ``stats``: a longer
    recording reaches more steps) is sampled too and kept where it comes closer (``search.second_order`` in the
    provenance records both errors). Selecting among second-order candidates fitted the few calibration runs and held
    out worse (the module docstring of ``second_order.py``)."""
    if step_reuse not in STEP_REUSE:
        raise ValueError(f"step_reuse must be one of {STEP_REUSE}, got {step_reuse!r}.")
    if step_reuse == "residual" and config.extrapolate_steps:
        raise ValueError(
            "step_reuse='residual' reuses H - x, but extrapolate_steps fits coefficients on H; search without "
            "extrapolate_steps."
        )
    family = resolve_family(pipe.transformer).name
    cases = check_cases(cases)

    def sample() -> torch.Tensor:
        return sample_outputs(pipe, family, cases, call_kwargs, batch_size or len(cases))

    reference = sample()

    def measure(plan) -> float:
        from .. import api

        with api.enabled(pipe, PlanConfig(plan, step_reuse=step_reuse)):
            return float(((sample() - reference) ** 2).mean())

    results = []
    for speedup in speedups:
        starts = _verified(stats, flops, replace(config, speedup=float(speedup), step_order=1), measure)
        if not starts:
            continue
        chosen = refined_best(stats, flops, starts, measure, refine) if refine else starts[0]
        if config.step_order == 2:
            chosen = _second_order_kept(refit_stats or stats, flops, chosen, measure)
        if step_reuse != "state":
            chosen.plan.provenance["search"]["step_reuse"] = step_reuse
        results.append(chosen)
    return results


def _second_order_kept(stats, flops, chosen: SearchResult, measure) -> SearchResult:
    """``chosen``'s second-order refit where it samples closer to full compute (``measure``), else ``chosen``; both
    errors recorded in the kept plan's provenance (``search.second_order``)."""
    speedup = chosen.plan.provenance["search"]["speedup"]
    refit = second_order_refit(stats, flops, chosen, speedup)
    if refit is None:
        chosen.plan.provenance["search"]["second_order"] = {"kept": False, "steps": 0}
        return chosen
    first = sampled_mse(chosen.plan)
    if first is None:  # a plan the selection did not sample
        first = measure(chosen.plan)
    second = measure(refit.plan)
    kept = math.isfinite(second) and second < first
    # first_order_mse: the searched plan's (first order, or plain reuse where the selection kept that).
    record = {**refit.plan.provenance["search"]["second_order"], "output_mse": second, "first_order_mse": first}
    result = refit if kept else chosen
    result.plan.provenance["search"]["second_order"] = {**record, "kept": kept}
    logger.info("%.3gx: second order on %d steps %s (sampled MSE %.4g, first order %.4g)", speedup,
                record["steps"], "kept" if kept else "dropped", second, first)  # fmt: skip
    return result


def sampled_mse(plan) -> float | None:
    """The calibration runs' sampled MSE of a verified plan as its provenance records it (after the descent when it
    was refined, of the second-order refit when that was kept), or None for a plan the selection did not sample."""
    search = plan.provenance.get("search", {})
    if search.get("second_order", {}).get("kept"):
        return search["second_order"]["output_mse"]
    if "refined" in search:
        return search["refined"]["moves"][-1][1]
    return search.get("verified", {}).get("output_mse")


def refined_best(stats, flops, starts: list[SearchResult], measure, rounds: int) -> SearchResult:
    """:func:`refined_plan` from every plan of ``starts`` (the best candidate of each unit setting,
    :func:`_verified`); the plan of least sampled error at the end is kept, every start's first and last error
    recorded in its provenance (``search.refined.starts``). The setting whose searched plan samples best is not always
    the one whose descent ends lowest (flux-shapes 5x: unit reuse at the last step only starts 4% worse than unit
    reuse on the computed steps and descends further)."""
    refined = []
    for start in starts:
        fill = None
        if start.plan.provenance["search"].get("last_step_units"):
            start, fill = sampled_last_step_fill(stats, flops, start, measure)
        refined.append(refined_plan(stats, flops, start, measure, rounds, fill))
    moves = [result.plan.provenance["search"]["refined"]["moves"] for result in refined]
    chosen = refined[int(np.argmin([steps[-1][1] for steps in moves]))]
    chosen.plan.provenance["search"]["refined"]["starts"] = [
        {"units": unit_setting(result.plan.provenance["search"]), "start_mse": steps[0][1], "end_mse": steps[-1][1]}
        for result, steps in zip(refined, moves, strict=True)
    ]
    return chosen


def sampled_last_step_fill(stats, flops, start: SearchResult, measure) -> tuple[SearchResult, list[str]]:
    """The unit reuse at the last step of ``start`` (a ``last_step_units`` plan) chosen on sampled error instead of
    the additive model: on ``start``'s computed steps, each unit stream reused alone at the last step is sampled
    (``measure``), and the streams of least added error per FLOP saved are taken until the budget is met
    (:func:`~invardiff.calibration.search.filled_plan`). One sampling pass per unit stream, plus one without any.
    The additive model rates a unit by its output's change against H's size and misses that some (flux-shapes'
    single-stream attention) cost several times more in the output. Returns the plan (its sampled error in
    ``search.last_step_fill``) and the streams; ``start`` and its own streams when no sampled fill meets the budget."""
    settings = dict(start.plan.provenance["search"])
    config = _settings_config(settings)
    computed = [int(t) for t in np.flatnonzero(~start.plan.step_cache)]
    free = replace(config, speedup=1.0)  # the schedule alone, then one stream at a time: below the budget
    base = measure(filled_plan(stats, flops, free, computed, []).plan)
    savings = unit_savings(stats, flops, config)
    added = {}
    for name in savings:
        single = filled_plan(stats, flops, free, computed, [name])
        added[name] = measure(single.plan) - base if single is not None else math.inf
    order = sorted(savings, key=lambda name: (added[name] / savings[name], name))
    chosen = []
    for name in order:
        if not math.isfinite(added[name]):
            break
        chosen.append(name)
        result = filled_plan(stats, flops, config, computed, chosen)
        if result is not None:
            error = measure(result.plan)
            result.plan.provenance["search"] = {
                **settings,
                "last_step_fill": {"units": chosen, "output_mse": error, "added_mse": added},
            }
            return result, chosen
    logger.info("no sampled fill at the last step meets %.3gx: keeping the searched one", config.speedup)
    return start, _last_step_streams(start.plan)


def _last_step_streams(plan) -> list[str]:
    """The unit streams a plan reuses at its last step."""
    from ..stats import unit_reuse

    last = plan.num_inference_steps - 1
    return [
        f"{facts.name}.{layer}.{unit}"
        for facts in plan.model.block_lists
        for unit, matrix in unit_reuse(plan, facts.name).items()
        for layer in np.flatnonzero(matrix[last])
    ]


def _settings_config(settings: dict) -> SearchConfig:
    """The search settings of a plan's provenance, runs up to the trajectories' window (see :func:`refined_plan`)."""
    return SearchConfig(
        settings["speedup"],
        warmup_steps=settings["warmup_steps"],
        max_run=None,
        extrapolate_steps=settings["extrapolate_steps"],
        extrapolate_units=settings["extrapolate_units"],
        reuse_units=settings["reuse_units"],
        unit_weight=settings["unit_weight"],
        last_step_units=settings.get("last_step_units", False),  # absent before it existed
        step_fit=settings.get("step_fit", "direct"),  # absent in plans of the direct fit
    )


def refined_plan(stats, flops, start: SearchResult, measure, rounds: int, fill: list[str] | None = None):
    """Descent on sampled error from ``start`` (a verified plan): each round tries moving every computed step one
    step earlier or later, with the search's settings of ``start`` (the same budget and unit reuse; units and
    coefficients re-fitted for the moved schedule by :func:`schedule_plan`), and keeps the first move whose plan has
    a lower ``measure(plan)`` (the sampled outputs' error against full compute's); it stops after ``rounds`` rounds
    or at a round without a better move. The moved schedules may hold reused runs up to the trajectories' window,
    whatever cap the verified selection kept: the cap was chosen for the additive model's plans, and the sampled
    error judges every move (at 5x on flux-shapes the cap of 5 kept the descent at 27.5 dB held out, the window of
    8 let it reach 28.5 dB). ``fill``: the unit streams reused at the last step, kept on every schedule
    (:func:`sampled_last_step_fill`) instead of re-allocated. The moves and errors are recorded in the plan's
    provenance (``search.refined``)."""
    settings = dict(start.plan.provenance["search"])
    config = _settings_config(settings)
    plans = {}

    def error_of(computed: tuple[int, ...]) -> float:
        if fill is not None:
            result = filled_plan(stats, flops, config, list(computed), fill)
        else:
            result = schedule_plan(stats, flops, config, list(computed))
        if result is None:
            return math.inf
        error = float(measure(result.plan))
        plans[computed] = result
        return error if math.isfinite(error) else math.inf

    first = tuple(int(t) for t in np.flatnonzero(~start.plan.step_cache))
    start_error = settings.get("last_step_fill", settings.get("verified", {})).get("output_mse")
    best, history = descend(first, error_of, config.warmup_steps, stats.num_steps, rounds, start_error)
    result = plans.get(best, start)
    result.plan.provenance["search"] = {**settings, "refined": {"rounds": rounds, "moves": history}}
    return result


def descend(
    start: tuple[int, ...],
    error_of,
    warmup: int,
    T: int,
    rounds: int,
    start_error: float | None = None,
    reach: int = DESCENT_REACH,
):
    """First-improvement descent over computed-step schedules: a move shifts one computed step (not step 0, the
    warm-up or the last step) by one to a step not computed; only when no such move is better, by up to ``reach``
    steps (a shift of 2 leaves local minima of single shifts: flux-shapes 5x stopped after 3 moves). Each schedule is
    measured once. Returns the best schedule and the accepted moves ``[(schedule, error), ...]`` (the start first)."""
    current = tuple(start)
    current_error = error_of(current) if start_error is None else start_error
    measured = {current: current_error}
    history = [(list(current), current_error)]

    def better(distance: int):
        for index, step in enumerate(current):
            if step < warmup or step == T - 1:
                continue
            for shifted in (step - distance, step + distance):
                if shifted < warmup or shifted >= T - 1 or shifted in current:
                    continue
                candidate = tuple(sorted((*current[:index], shifted, *current[index + 1 :])))
                if candidate not in measured:
                    measured[candidate] = error_of(candidate)
                if measured[candidate] < current_error:
                    return candidate
        return None

    for _ in range(rounds):
        moved = next((c for c in (better(d) for d in range(1, reach + 1)) if c is not None), None)
        if moved is None:
            break
        current, current_error = moved, measured[moved]
        history.append((list(current), current_error))
    return current, history


def unit_setting(search: dict) -> str:
    """How a searched plan reuses units: ``"computed"`` steps, the ``"last"`` step only, or ``"off"``."""
    return "last" if search.get("last_step_units") else "computed" if search["reuse_units"] else "off"


def _verified(stats, flops, config: SearchConfig, measure) -> list[SearchResult]:
    """The candidates of least output error (``measure(plan)``) at ``config.speedup``, one per unit setting
    (:func:`unit_setting`), the best first; each plan's provenance records every candidate's error. Empty (with a
    warning) when no cap reaches the target."""
    candidates, errors = [], []
    for max_run, units, last, (extrapolate_steps, extrapolate_units) in verify_grid(config):
        try:
            setting = replace(
                config,
                max_run=max_run,
                reuse_units=units,
                last_step_units=last,
                extrapolate_steps=extrapolate_steps,
                extrapolate_units=extrapolate_units,
            )
            result = search_plan(stats, flops, setting)
        except BudgetError as error:
            logger.info("%.3gx with runs of at most %s: %s", config.speedup, max_run or "window", error)
            continue
        if any(_same_plan(result.plan, other.plan) for other in candidates):
            continue  # a cap the plan never reaches gives the same plan
        candidates.append(result)
        error = measure(result.plan)
        errors.append(error if math.isfinite(error) else math.inf)  # a plan that turns the output NaN loses
    if not candidates:
        logger.warning("skipping %.3gx: no cap on reused runs reaches it", config.speedup)
        return []
    recorded = [
        {
            "max_run": c.plan.provenance["search"]["max_run"],
            "reuse_units": c.plan.provenance["search"]["reuse_units"],
            "last_step_units": c.plan.provenance["search"].get("last_step_units", False),
            "extrapolates": c.plan.extrapolates,
            "output_mse": e,
            "model_error": c.error,
        }
        for c, e in zip(candidates, errors, strict=True)
    ]
    starts, settings = [], set()
    for index in np.argsort(errors, kind="stable"):
        setting = unit_setting(candidates[index].plan.provenance["search"])
        if setting in settings:
            continue
        settings.add(setting)
        candidates[index].plan.provenance["search"]["verified"] = {"output_mse": errors[index], "candidates": recorded}
        starts.append(candidates[index])
    search = starts[0].plan.provenance["search"]
    logger.info(
        "%.3gx: kept the plan with runs of at most %d, unit reuse %s, %s",
        config.speedup,
        search["max_run"],
        unit_setting(search),
        "extrapolating" if starts[0].plan.extrapolates else "without extrapolation",
    )
    return starts


def verify_grid(config: SearchConfig) -> list[tuple]:
    """The (max_run, reuse_units, last_step_units, (extrapolate_steps, extrapolate_units)) settings whose searched
    plans the verified selection samples. A config that extrapolates is tried without extrapolation too: fitted
    coefficients lower the calibration trajectories' error, but where a model's reused steps drift in ways two
    computed values do not predict they can sample worse than plain reuse (wan-motion at 4x: 34.3 dB with reused
    steps extrapolated, 38.0 without), and sampling decides that as it decides the cap."""
    units = [u for u in VERIFY_UNIT_REUSE if config.reuse_units or not u[0]]
    asked = (config.extrapolate_steps, config.extrapolate_units)
    extrapolation = [asked, (False, False)] if any(asked) else [asked]
    return [(max_run, *reuse, e) for e in extrapolation for reuse in units for max_run in VERIFY_MAX_RUNS]


def _same_plan(a, b) -> bool:
    """Same decisions, both with or both without extrapolation (the coefficients follow from the decisions)."""
    first, second = a.to_dict(), b.to_dict()
    same_reuse = all(first[key] == second[key] for key in ("step_cache", "module_reuse"))
    return same_reuse and a.extrapolates == b.extrapolates


def sample_outputs(pipe, family: str, cases: list[tuple], call_kwargs: dict, batch_size: int) -> torch.Tensor:
    """The pipeline's outputs for ``cases`` ((input, seed or noise) pairs, ``batch_size`` per call; every output as
    float32 on the CPU, concatenated over the batches): what the verified selection samples a candidate plan with."""
    outputs = [
        output_tensor(call_pipeline(pipe, family, cases[start : start + batch_size], call_kwargs)).float().cpu()
        for start in range(0, len(cases), batch_size)
    ]
    return torch.cat(outputs)
