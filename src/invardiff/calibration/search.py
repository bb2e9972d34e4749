"""Budgeted plan search: the plan with the least calibration-set error at a FLOP-ideal speedup target.

InvarDiff's quantile thresholds have no notion of a budget; this search takes the target speedup as the constraint
and the errors measured on the calibration trajectories (:class:`TrajectoryStats`) as the objective, in the spirit
of offline global schedules (LeMiCa, BudCache, ERTACache). It chooses every step and every (unit, step) decision
itself, which subsumes quantile levels per module kind and caps on consecutive reused steps (a quantile plan is
one point of this space; ``max_run`` is the cap).

Error model (additive over steps, measured on full-compute trajectories, relative to H's RMS at that step):

* a reused step ``t`` whose last computed step is ``a`` costs ``|H_t - Ĥ_t| / |H_t|`` where ``Ĥ_t = H_a`` or, with
  ``extrapolate_steps``, ``H_a + c (H_a - H_p)`` (``p`` the computed step before ``a``, ``c`` least squares);
* a reused unit at computed step ``s`` costs ``unit_weight * RMS(Z_s - Ẑ_s) / RMS(H_s)`` (its error enters the
  residual stream element-wise; gates and later layers are ignored, which ``unit_weight`` can correct).

Search: for every number ``n`` of computed steps, the step schedule of least error is found exactly by dynamic
programming (runs of reused steps at most ``max_run`` long); the FLOPs the budget still needs are then taken from
unit reuse on the computed steps: each unit's least error for every reuse count is again exact (dynamic
programming), and the counts are allocated across units greedily along each unit's lower convex hull (exact for
one unit; a standard heuristic for several). The result meets the budget exactly: its FLOP-ideal speedup is at
least the target and its FLOPs are less than one step's worth below the budget.

Memory bound (``SearchConfig.memory``): the plan must also keep at most ``max_cache_bytes`` of cache on a model
config. The search's plan is fitted to the bound (:func:`invardiff.memory_fit.fit_memory`: the reuses of least
FLOPs are computed instead), and while the fitted plan falls short of the target the search is rerun at a target
raised by the shortfall; the result is the first fitted plan that meets the target. Step caching keeps only H, so
under a tight bound the plans lean on it more.

:func:`schedule_plan` builds the same plan for a given step schedule (what ``calibrate_budget(refine=N)``'s
descent on sampled error moves between). The budget counts what the FLOP-ideal speedup counts, extrapolation lerps
included.

Trade-off: the error model is a proxy, fitted on the calibration inputs; the sweep measures the true error on
held-out inputs. Search time grows with ``T^2 * max_run^2`` per unit with unit extrapolation (seconds for T=50).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from ..families import get_family
from ..plan import CachePlan
from ..stats import ideal_speedup
from .result import SearchResult
from .second_order import second_order_refit
from .trajectory import STEP_STREAM, TrajectoryStats


logger = logging.getLogger(__name__)

STEP_FITS = ("direct", "scale_free")


@dataclass(frozen=True)
class SearchConfig:
    """What the budgeted search may do.

    Args:
        speedup (`float`): the FLOP-ideal speedup target (2.5 = 40% of full compute's FLOPs).
        warmup_steps (`int`, defaults to `1`): leading steps that compute everything (step 0 always must).
        max_run (`int`, optional): most consecutive reused steps, and most steps a unit's reuse may span; default
            and upper bound: the trajectories' window. Shorter runs drift less, longer ones reach higher speedups.
        extrapolate_steps (`bool`): reused steps extrapolate from the last two computed H (least-squares
            coefficients stored in the plan) instead of returning the stale H. Never worse on the calibration set.
        extrapolate_units (`bool`): the same for reused units.
        reuse_units (`bool`, defaults to `True`): allow unit reuse on computed steps (layer-wise caching).
        last_step_units (`bool`): unit reuse only at the last step (from the computed step before it), which the
            default search always computes in full: it fills what the step schedule leaves of the budget where no
            later step can carry the error further (at 5x on flux-shapes the default unit reuse, 4-8 steps stale
            on earlier computed steps, cost 3.8 dB; see ``benchmarks/results/frontier/README.md``).
        unit_weight (`float`, defaults to `1.0`): weight of a unit's error against a step's error.
        step_fit (`str`, defaults to `"direct"`): how a reused step's error and extrapolation coefficient are
            fitted. ``"direct"``: least squares on H itself (:meth:`TrajectoryStats.fit`). ``"scale_free"``: up to
            H's scale (:meth:`TrajectoryStats.fit_scale_free`), for families whose output head normalises H per
            token (an AdaLN ``norm_out``: FLUX, SD3, DiT, Wan, ...), which the direct fit's coefficient otherwise
            partly spends on H's shrinking norm. Stored coefficients keep plan format version 2. Held out on
            flux-shapes at 4x it is not better than the direct fit (``benchmarks/results/frontier/README.md``).
        memory (`MemoryBound`, optional): a bound on the plan's peak cache memory on a model config.
        step_order (`int`, defaults to `1`): with ``extrapolate_steps``, 2 refits the searched plan's reused steps at
            second order where the trajectories' window holds their three last computed steps (``v_a + c1 (v_a -
            v_p) + c2 (v_a - 2 v_p + v_q)``, :mod:`invardiff.calibration.second_order`; plan format version 4), as
            far as the budget leaves room for the second lerp. The schedule and units are searched at first order.
            Costs a third kept H at those runs' anchors and a second lerp per such reused step; never a larger
            modelled error than first order (with ``verify``, kept only where it samples closer).
    """

    speedup: float
    warmup_steps: int = 1
    max_run: int | None = None
    extrapolate_steps: bool = False
    extrapolate_units: bool = False
    reuse_units: bool = True
    unit_weight: float = 1.0
    memory: MemoryBound | None = None
    last_step_units: bool = False
    step_fit: str = "direct"
    step_order: int = 1

    def __post_init__(self):
        if self.step_fit not in STEP_FITS:
            raise ValueError(f"step_fit must be one of {STEP_FITS}, got {self.step_fit!r}.")
        if self.step_order not in (1, 2):
            raise ValueError(f"step_order must be 1 or 2, got {self.step_order!r}.")
        if self.step_order == 2 and not self.extrapolate_steps:
            raise ValueError("step_order=2 is the order reused steps are extrapolated with: set extrapolate_steps.")
        if self.step_order == 2 and self.step_fit != "direct":
            raise NotImplementedError("step_order=2 has a direct fit only; drop step_fit='scale_free'.")
        if self.step_order == 2 and self.memory is not None:
            raise NotImplementedError(
                "step_order=2 with a memory bound: the refit keeps a third H that the bounded search does not count; "
                "search with one or the other."
            )
        if not isinstance(self.speedup, (int, float)) or not self.speedup >= 1.0:
            raise ValueError(f"speedup must be a FLOP-ideal speedup >= 1 (e.g. 2.5), got {self.speedup!r}.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1 (step 0 computes), got {self.warmup_steps!r}.")
        if self.max_run is not None and (not isinstance(self.max_run, int) or self.max_run < 1):
            raise ValueError(f"max_run must be an integer >= 1 or None, got {self.max_run!r}.")
        if self.last_step_units and not self.reuse_units:
            raise ValueError("last_step_units places unit reuse at the last step: it needs reuse_units=True.")
        if not self.unit_weight >= 0.0:
            raise ValueError(f"unit_weight must be >= 0, got {self.unit_weight!r}.")
        if self.memory is not None and self.memory.cache_dtype and (self.extrapolate_steps or self.extrapolate_units):
            raise ValueError("A cache_dtype does not go with extrapolation (plans cannot have both); drop one.")


@dataclass(frozen=True)
class MemoryBound:
    """A bound on a searched plan's peak cache memory.

    Args:
        max_cache_bytes (`int`): the most bytes the engine may hold for one run (``invardiff.memory.cache_memory``).
        footprint (`CacheFootprint`): the model config the bound is on
            (:func:`invardiff.cache_footprint.measure_footprint`), at the sampling call's shapes and dtype.
        cache_dtype (`str`, optional): the plans' cache storage dtype (``engine/storage.py``).
    """

    max_cache_bytes: int
    footprint: object
    cache_dtype: str | None = None


class BudgetError(ValueError):
    """No plan the search may build reaches the requested speedup."""


def parse_budget(text: str) -> float:
    """``"2.5x"`` or ``"2.5"`` -> 2.5."""
    try:
        value = float(str(text).strip().lower().removesuffix("x"))
    except ValueError:
        raise ValueError(f"A budget is a FLOP-ideal speedup such as 2.5x, got {text!r}.") from None
    if not value >= 1.0:
        raise ValueError(f"A budget is a speedup >= 1 (e.g. 2.5x), got {text!r}.")
    return value


def search_plan(
    stats: TrajectoryStats, flops, config: SearchConfig, refit_stats: TrajectoryStats | None = None
) -> SearchResult:
    """The plan of least calibration-set error whose FLOP-ideal speedup on ``flops`` meets ``config.speedup``.

    ``flops`` is the :class:`invardiff.flops.FlopProfile` of the model at the sampling shapes. Raises
    :class:`BudgetError` when the target is out of reach (the message gives the fastest reachable speedup).
    ``refit_stats``: what the second-order refit (``config.step_order=2``) reads, default ``stats`` (a longer
    recording of the same runs reaches more steps: :meth:`TrajectoryStats.within`).
    """
    if config.step_order == 2:
        result = search_plan(stats, flops, replace(config, step_order=1))
        return second_order_refit(refit_stats or stats, flops, result, config.speedup) or result
    if config.memory is not None:
        return _memory_bounded(stats, flops, config)
    return _Search(stats, flops, config).run()


MAX_TARGET_RAISES = 20


def _memory_bounded(stats: TrajectoryStats, flops, config: SearchConfig) -> SearchResult:
    """The search at ``config.speedup``, fitted to ``config.memory``; rerun at raised targets until the fitted plan
    meets the speedup (see the module docstring)."""
    from ..memory_fit import MemoryBoundError, fit_memory

    bound = config.memory
    low, high, target = config.speedup, math.inf, config.speedup  # fitted short at low; out of reach at high
    for _ in range(MAX_TARGET_RAISES):
        try:
            result = _Search(stats, flops, replace(config, speedup=target)).run()
        except BudgetError as error:
            if target == config.speedup:
                raise
            high, last_error = target, error
        else:
            try:
                plan = fit_memory(result.plan, bound.footprint, flops, bound.max_cache_bytes, bound.cache_dtype)
            except MemoryBoundError as error:
                raise BudgetError(str(error)) from None
            speedup = ideal_speedup(plan, flops)
            if speedup >= config.speedup:
                search = plan.provenance["search"]
                search.update(speedup=config.speedup, searched_speedup=target, max_cache_bytes=bound.max_cache_bytes)
                search.update(model_config=bound.footprint.config_name, cache_dtype=bound.cache_dtype)
                return SearchResult(plan, result.error, result.step_error, result.unit_error, speedup)
            low = target
        # Raise by the shortfall; when that is out of reach, halve the gap (geometrically) instead.
        raised = low * config.speedup / speedup * (1 + 1e-3) if high == math.inf else math.sqrt(low * high)
        if raised >= high or high / low < 1.001:
            break
        target = raised
    reason = f": {last_error}" if high < math.inf else ""
    raise BudgetError(
        f"{config.speedup:g}x within {bound.max_cache_bytes} bytes of cache is out of reach: the fitted plans of the "
        f"searches from {config.speedup:g}x to {target:.3g}x all fall short{reason} Raise the bound, a narrower "
        f"cache dtype, or lower the budget."
    )


def schedule_plan(stats: TrajectoryStats, flops, config: SearchConfig, computed: list[int]) -> SearchResult | None:
    """The plan :func:`search_plan` would build on exactly the computed steps ``computed`` (step 0, the warm-up and
    the last step included), its units allocated to meet ``config.speedup``; None when that schedule has a reused run
    longer than the cap or cannot meet the budget. What a search on sampled error moves between."""
    return _Search(stats, flops, config).for_schedule(computed)


def filled_plan(
    stats: TrajectoryStats, flops, config: SearchConfig, computed: list[int], units: list[str]
) -> SearchResult | None:
    """The plan of the computed steps ``computed`` whose unit streams ``units`` (``"transformer_blocks.3.attn"``) are
    reused at the last step and no unit elsewhere (modelled errors as in :func:`search_plan`); None when the schedule
    breaks the run limit or the plan misses ``config.speedup``. What a fill chosen on sampled error is built with."""
    return _Search(stats, flops, config).with_last_step_units(computed, units)


def unit_savings(stats: TrajectoryStats, flops, config: SearchConfig) -> dict[str, float]:
    """FLOPs one reuse of each unit stream saves (the streams the search may reuse under ``config``)."""
    return {name: saving for name, _, _, _, saving in _Search(stats, flops, config).units}


def pareto_plans(
    stats: TrajectoryStats, flops, speedups, config: SearchConfig, refit_stats: TrajectoryStats | None = None
) -> list[SearchResult]:
    """One searched plan per speedup target (the same settings otherwise; ``refit_stats`` as in
    :func:`search_plan`); targets out of reach are skipped with a warning."""
    results = []
    for speedup in speedups:
        try:
            results.append(search_plan(stats, flops, replace(config, speedup=float(speedup)), refit_stats))
        except BudgetError as error:
            logger.warning("skipping %.3gx: %s", speedup, error)
    return results


class _Search:
    def __init__(self, stats: TrajectoryStats, flops, config: SearchConfig):
        flops.check_plan(CachePlan.reuse_nothing(stats.model, stats.num_steps))
        self.stats, self.flops, self.config = stats, flops, config
        self.T = stats.num_steps
        if config.warmup_steps >= self.T:
            raise BudgetError(f"warmup_steps={config.warmup_steps} leaves nothing to reuse in {self.T} steps.")
        self.run_limit = min(config.max_run or stats.window, stats.window)
        self.budget = self.T * flops.full_step / config.speedup
        self.units = self._unit_streams() if config.reuse_units else []
        self.step_error = functools.lru_cache(maxsize=None)(self._step_error)
        self.unit_error = functools.lru_cache(maxsize=None)(self._unit_error)  # shared by every step schedule

    def _unit_streams(self) -> list[tuple[str, str, int, str, float]]:
        streams = []
        for name in self.stats.unit_streams:
            block_list, layer, unit = name.split(".")
            saving = float(self.flops.units[block_list][unit][int(layer)])
            if self.config.extrapolate_units:  # a reuse that extrapolates rebuilds the value (one lerp)
                saving -= self._lerp_flops(self.flops.unit_elements.get(block_list, {}).get(unit), int(layer))
            if saving > 0:
                streams.append((name, block_list, int(layer), unit, saving))
        return streams

    def _lerp_flops(self, elements, layer: int | None = None) -> float:
        """FLOPs of one extrapolated reuse of a value of ``elements`` (per layer when ``layer`` is given); 0 when
        the profile does not record the stream's size."""
        if elements is None:
            return 0.0
        return self.flops.extrapolation_flops(float(elements[layer] if layer is not None else elements))

    def schedule_flops(self, n: int, step_coefficients: dict[int, float]) -> float:
        """FLOPs of a step schedule with ``n`` computed steps (before unit reuse): the extrapolated reused steps
        (nonzero coefficient) rebuild H with one lerp each, which the FLOP-ideal speedup counts too."""
        extrapolated = sum(1 for c in step_coefficients.values() if c != 0)
        lerp = self._lerp_flops(self.flops.step_elements)
        return n * self.flops.full_step + (self.T - n) * self.flops.step_cached + extrapolated * lerp

    # ----- errors -----
    def _step_error(self, previous, anchor: int, t: int) -> tuple[float, float]:
        extrapolate, scale_free = self.config.extrapolate_steps, self.config.step_fit == "scale_free"
        return _reuse(self.stats, STEP_STREAM, previous, anchor, t, extrapolate, self.run_limit, scale_free)

    def _unit_error(self, stream: str, previous, anchor: int, t: int) -> tuple[float, float]:
        return _reuse(self.stats, stream, previous, anchor, t, self.config.extrapolate_units, self.run_limit)

    # ----- steps -----
    def step_schedules(self) -> dict[int, tuple[float, list[int], dict[int, float]]]:
        """For each count n of computed steps: (least step error, computed steps, coefficient per reused step)."""
        T, warmup, limit = self.T, self.config.warmup_steps, self.run_limit
        extrapolate = self.config.extrapolate_steps
        start = (warmup - 2 if extrapolate and warmup >= 2 else None, warmup - 1)
        table: dict[tuple, dict[int, tuple[float, object]]] = {start: {warmup: (0.0, None)}}
        for anchor in range(warmup - 1, T - 1):
            for key in [key for key in table if key[1] == anchor]:
                previous = key[0]
                for nxt in range(anchor + 1, min(anchor + limit + 1, T - 1) + 1):
                    added = sum(self.step_error(previous, anchor, t)[0] for t in range(anchor + 1, nxt))
                    # The computed step before `nxt` matters only while a later reuse could extrapolate from it.
                    keep = extrapolate and nxt + 1 - anchor <= self.stats.window
                    target = table.setdefault((anchor if keep else None, nxt), {})
                    for n, (cost, _) in table[key].items():
                        if n + 1 not in target or cost + added < target[n + 1][0]:
                            target[n + 1] = (cost + added, (key, n))
        schedules = {}
        for key, entries in table.items():
            if key[1] != T - 1:
                continue
            for n, (cost, _) in entries.items():
                if n not in schedules or cost < schedules[n][0]:
                    schedules[n] = (cost, self._computed(table, key, n))
        result = {}
        for n, (cost, computed) in schedules.items():
            result[n] = (cost, computed, self._step_coefficients(computed))
        return result

    def _computed(self, table, key, n) -> list[int]:
        steps = []
        while key is not None:
            steps.append(key[1])
            parent = table[key][n][1]
            key, n = parent if parent is not None else (None, None)
        steps = sorted(set(steps) | set(range(self.config.warmup_steps)))
        return steps

    def _step_coefficients(self, computed: list[int]) -> dict[int, float]:
        return {
            t: self.step_error(previous, anchor, t)[1] for t, (anchor, previous) in self._anchors(computed).items()
        }

    # ----- units -----
    def unit_curve(self, stream: str, computed: tuple[int, ...]) -> tuple[np.ndarray, list[list[int]]]:
        """Least error of ``stream`` for every reuse count on the computed steps, and the reused steps of each."""
        return _unit_curve(self, stream, computed)

    # ----- the whole search -----
    def run(self) -> SearchResult:
        full, cached = self.flops.full_step, self.flops.step_cached
        schedules = self.step_schedules()
        best = None
        for n in sorted(schedules):
            step_cost, computed, step_coefficients = schedules[n]
            flops = self.schedule_flops(n, step_coefficients)
            need = flops - self.budget
            if best is not None and step_cost >= best[0]:
                continue
            if need <= 0 and flops < self.budget - (full - cached) * (1 + 1e-9):
                continue  # faster than asked by more than one step's worth: not this budget's plan
            candidate = self._candidate(step_cost, computed, step_coefficients, need)
            if candidate is not None and (best is None or candidate[0] < best[0]):
                best = candidate
        if best is None:
            raise BudgetError(self._out_of_reach())
        return self._result(best)

    def for_schedule(self, computed: list[int]) -> SearchResult | None:
        """The plan of least modelled error with exactly these computed steps (units allocated as in :meth:`run`),
        or None when the schedule breaks the run limit or the budget cannot be met on it."""
        computed = sorted(computed)
        schedule = self._schedule_cost(computed)
        if schedule is None:
            return None
        step_cost, coefficients = schedule
        need = self.schedule_flops(len(computed), coefficients) - self.budget
        candidate = self._candidate(step_cost, computed, coefficients, need)
        return None if candidate is None else self._result(candidate)

    def with_last_step_units(self, computed: list[int], units: list[str]) -> SearchResult | None:
        """The plan of ``computed`` reusing exactly ``units`` at the last step (see :func:`filled_plan`)."""
        computed = sorted(computed)
        schedule = self._schedule_cost(computed)
        if schedule is None or len(computed) < 2:
            return None
        step_cost, coefficients = schedule
        last, anchor = computed[-1], computed[-2]
        previous = computed[-3] if len(computed) >= 3 else None
        unit_cost, choices = 0.0, {}
        for name in units:
            error, coefficient = self.unit_error(name, previous, anchor, last)
            unit_cost += error
            choices[name] = {last: coefficient}
        if not math.isfinite(unit_cost):
            return None
        total = step_cost + self.config.unit_weight * unit_cost
        result = self._result((total, step_cost, unit_cost, computed, coefficients, choices))
        return result if result.ideal_speedup >= self.config.speedup * (1 - 1e-9) else None

    def _schedule_cost(self, computed: list[int]):
        """(step error, coefficient per reused step) of a sorted schedule; None when it is not one the search may
        build (step 0, the warm-up and the last step computed, runs within the limit)."""
        if (
            computed[0] != 0
            or computed[-1] != self.T - 1
            or computed[: self.config.warmup_steps] != list(range(self.config.warmup_steps))
        ):
            return None
        coefficients = self._step_coefficients(computed)
        step_cost = 0.0
        for t, (anchor, previous) in self._anchors(computed).items():
            step_cost += self.step_error(previous, anchor, t)[0]
        return (step_cost, coefficients) if math.isfinite(step_cost) else None

    def _anchors(self, computed: list[int]) -> dict[int, tuple]:
        """Per reused step: (its last computed step, the one before or None)."""
        anchors = {}
        for t in range(self.T):
            if t not in computed:
                earlier = [s for s in computed if s < t]
                anchors[t] = (earlier[-1], earlier[-2] if len(earlier) >= 2 else None)
        return anchors

    def _candidate(self, step_cost: float, computed: list[int], step_coefficients: dict, need: float):
        if need <= 0:
            return (step_cost, step_cost, 0.0, computed, step_coefficients, {})
        allocation = self._allocate_units(tuple(computed), need)
        if allocation is None:
            return None
        unit_cost, unit_choices = allocation
        total = step_cost + self.config.unit_weight * unit_cost
        return (total, step_cost, unit_cost, computed, step_coefficients, unit_choices)

    def _result(self, best: tuple) -> SearchResult:
        total, step_cost, unit_cost, computed, step_coefficients, unit_choices = best
        plan = self._plan(computed, step_coefficients, unit_choices)
        speedup = ideal_speedup(plan, self.flops)
        logger.info(
            "searched plan: %d/%d steps computed, %.3gx ideal, error %.4g", len(computed), self.T, speedup, total
        )
        return SearchResult(plan, total, step_cost, unit_cost, speedup)

    def _out_of_reach(self) -> str:
        T, warmup, limit = self.T, self.config.warmup_steps, self.run_limit
        interior = T - 1 - warmup  # steps that may be reused
        fewest = warmup + 1 + math.ceil(interior / (limit + 1))
        reused = T - fewest
        flops = fewest * self.flops.full_step + reused * self.flops.step_cached
        unit_steps = 1 if self.config.last_step_units else max(0, fewest - warmup - 1)  # steps that may reuse units
        units = sum(stream[-1] for stream in self.units) * unit_steps
        fastest = T * self.flops.full_step / max(flops - units, 1.0)
        return (
            f"A FLOP-ideal speedup of {self.config.speedup:g}x is out of reach with {T} steps, {warmup} warm-up "
            f"step(s) and runs of at most {limit} reused steps (an upper bound: {fastest:.3g}x). Lower the budget, "
            f"or record the trajectories with a larger window."
        )

    def _allocate_units(self, computed: tuple[int, ...], need: float):
        curves = []
        for name, _, _, _, saving in self.units:
            errors, reuses = self.unit_curve(name, computed)
            curves.append((name, saving, errors, reuses))
        counts = _allocate(curves, need)
        if counts is None:
            return None
        cost = sum(curves[i][2][count] for i, count in enumerate(counts))
        choices = {curves[i][0]: curves[i][3](count) for i, count in enumerate(counts) if count}
        return cost, choices

    def _plan(self, computed: list[int], step_coefficients: dict[int, float], unit_choices: dict) -> CachePlan:
        T = self.T
        step_cache = np.ones(T, dtype=bool)
        step_cache[computed] = False
        family = get_family(self.stats.model.family)
        unit_reuse, unit_coefficients = {}, {}
        for facts in self.stats.model.block_lists:
            spec = family.block_list(facts.name)
            spec.check_kinds_unshared("the search decides per unit and cannot write such a plan")
            for unit in spec.units:
                bits = np.zeros((T, facts.num_layers), dtype=bool)
                coefficients = np.zeros((T, facts.num_layers))
                for layer in range(facts.num_layers):
                    name = f"{facts.name}.{layer}.{unit.name}"
                    for s, coefficient in unit_choices.get(name, {}).items():
                        bits[s, layer], coefficients[s, layer] = True, coefficient
                bits[step_cache] = True  # step-cached rows never execute (official books mark them reused)
                unit_reuse[facts.name, unit.name] = bits
                unit_coefficients.setdefault(facts.name, {})[unit.name] = coefficients
        module_reuse = {
            facts.name: {
                kind: next(
                    unit_reuse[facts.name, u.name] for u in family.block_list(facts.name).units if kind in u.kinds
                )
                for kind in facts.module_kinds
            }
            for facts in self.stats.model.block_lists
        }
        steps = np.zeros(T)
        for t, coefficient in step_coefficients.items():
            steps[t] = coefficient
        config = self.config
        provenance = {
            "policy": "invardiff-search",
            "search": {
                "speedup": config.speedup,
                "warmup_steps": config.warmup_steps,
                "max_run": self.run_limit,
                "extrapolate_steps": config.extrapolate_steps,
                "extrapolate_units": config.extrapolate_units,
                "reuse_units": config.reuse_units,
                "unit_weight": config.unit_weight,
                **({"last_step_units": True} if config.last_step_units else {}),
                **({"step_fit": config.step_fit} if config.step_fit != "direct" else {}),
            },
            "calibration": dict(self.stats.provenance),
        }
        return CachePlan(
            self.stats.model,
            T,
            step_cache,
            module_reuse,
            self.stats.provenance.get("scheduler"),
            provenance,
            step_extrapolation=steps if config.extrapolate_steps else None,
            unit_extrapolation=unit_coefficients if config.extrapolate_units else None,
        )


def _reuse(
    stats: TrajectoryStats,
    stream: str,
    previous,
    anchor: int,
    t: int,
    extrapolate: bool,
    limit: int,
    scale_free: bool = False,
):
    """(relative error, coefficient) of stream's value at ``t`` from its last computed value(s); ``scale_free``:
    both up to the value's scale (``SearchConfig.step_fit``)."""
    if t - anchor > limit:
        return math.inf, 0.0
    if extrapolate and previous is not None and t - previous <= stats.window:
        fit = stats.fit_scale_free if scale_free else stats.fit
        coefficient, squared = fit(stream, previous, anchor, t)
    else:
        error = stats.scale_free_error if scale_free else stats.reuse_error
        coefficient, squared = 0.0, error(stream, anchor, t)
    return stats.relative(stream, squared, t), coefficient


def _unit_curve(search: _Search, stream: str, computed: tuple[int, ...]):
    """Dynamic programming over the computed steps of one unit stream: for each reuse count r, the least error,
    and a function giving the reused steps (with their coefficients) of count r. States: (computed step before the
    anchor, anchor); backpointers per state and count keep the work linear in the number of counts."""
    stats, config, limit = search.stats, search.config, search.run_limit
    extrapolate = config.extrapolate_units
    size = len(computed) + 1
    start = np.full(size, math.inf)
    start[0] = 0.0
    keys, costs = [(None, computed[0])], [start]
    history = []  # per position: (parent index (K, size), reused (K, size), coefficient per parent index)
    for index in range(1, len(computed)):
        s = computed[index]
        last = s == search.T - 1
        eligible = last if config.last_step_units else s >= config.warmup_steps and not last
        frontier, coefficients = _Frontier(size), {}
        for parent, ((previous, anchor), values) in enumerate(zip(keys, costs, strict=True)):
            keep = extrapolate and s + 1 - anchor <= stats.window
            frontier.offer((anchor if keep else None, s), values, parent, False)  # compute at s
            if eligible and s - anchor <= limit:
                error, coefficients[parent] = search.unit_error(stream, previous, anchor, s)
                shifted = np.full(size, math.inf)
                shifted[1:] = values[:-1] + error
                frontier.offer((previous, anchor), shifted, parent, True)
        keys = sorted(frontier.slots, key=frontier.slots.get)
        costs = frontier.costs
        history.append((np.stack(frontier.parents), np.stack(frontier.reused), coefficients))
    stacked = np.stack(costs)  # (K, size)
    best_key = stacked.argmin(axis=0)
    best = stacked[best_key, np.arange(size)]

    def reuses(r: int) -> dict[int, float]:
        chosen, key = {}, int(best_key[r])
        for index in range(len(computed) - 1, 0, -1):
            parents, reused, coefficients = history[index - 1]
            parent = int(parents[key, r])
            if reused[key, r]:
                chosen[computed[index]] = coefficients[parent]
                r -= 1
            key = parent
        return chosen

    return best, reuses


class _Frontier:
    """One position of a unit's dynamic programme: per state, the least cost of every reuse count, and for each
    count the parent state and whether this step reused."""

    def __init__(self, size: int):
        self.size = size
        self.slots: dict = {}  # state -> row
        self.costs: list[np.ndarray] = []
        self.parents: list[np.ndarray] = []
        self.reused: list[np.ndarray] = []

    def offer(self, key, values: np.ndarray, parent: int, reuse: bool) -> None:
        slot = self.slots.get(key)
        if slot is None:
            self.slots[key] = len(self.costs)
            self.costs.append(values.copy())
            self.parents.append(np.full(self.size, parent))
            self.reused.append(np.full(self.size, reuse))
            return
        better = values < self.costs[slot]
        self.costs[slot][better] = values[better]
        self.parents[slot][better] = parent
        self.reused[slot][better] = reuse


def _allocate(curves, need: float):
    """Reuse counts per unit with savings >= need and small total error: greedy along each curve's lower convex
    hull by error per FLOP, then the last unit moved takes its cheapest count that still meets the need."""
    counts = [0] * len(curves)
    hulls = [_lower_hull(errors) for _, _, errors, _ in curves]
    positions = [0] * len(curves)
    saved = 0.0
    last = None
    while saved < need:
        best, best_slope = None, math.inf
        for i, hull in enumerate(hulls):
            if positions[i] + 1 < len(hull):
                r0, r1 = hull[positions[i]], hull[positions[i] + 1]
                errors, saving = curves[i][2], curves[i][1]
                slope = (errors[r1] - errors[r0]) / (saving * (r1 - r0))
                if slope < best_slope:
                    best, best_slope = i, slope
        if best is None:
            return None
        positions[best] += 1
        counts[best] = hulls[best][positions[best]]
        saved += curves[best][1] * (counts[best] - hulls[best][positions[best] - 1])
        last = best
    if last is not None:  # the hull may overshoot: any count of the last unit that still covers the need
        errors, saving = curves[last][2], curves[last][1]
        others = saved - saving * counts[last]
        feasible = [r for r in range(len(errors)) if np.isfinite(errors[r]) and others + saving * r >= need]
        counts[last] = min(feasible, key=lambda r: (errors[r], r))
    return counts


def _lower_hull(errors: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (r, errors[r]) from r = 0, over the finite entries."""
    points = [r for r in range(len(errors)) if np.isfinite(errors[r])]
    hull: list[int] = []
    for r in points:
        while len(hull) >= 2:
            r0, r1 = hull[-2], hull[-1]
            if (errors[r1] - errors[r0]) * (r - r0) >= (errors[r] - errors[r0]) * (r1 - r0):
                hull.pop()
            else:
                break
        hull.append(r)
    return hull
