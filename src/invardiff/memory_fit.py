"""Fit a plan to a bound on peak cache memory, giving up as little FLOP-ideal speedup as possible.

A plan transform: the fitted plan computes some of the entries the plan reused and changes nothing else (the step
cache, the other reuses, the storage dtype unless one is given). Which entries: the set of least FLOPs whose
dropping brings the peak under the bound, found exactly.

The problem (``cache_footprint.py``): each reused entry ``i`` (a unit at an executed step) saves ``f_i`` FLOPs and
holds ``s_i`` bytes over one interval of the run; the held bytes at an event are the sum over the kept entries
whose interval covers it, plus H. Listing the entries by (executed step, execution position), the entries that
cover any one event are a window of ``U`` consecutive positions (the units already reached at step ``k`` hold for
step ``k+1``, the others for step ``k``). So the fit is: keep a subset of maximum total ``f`` such that every
window's ``s``-weight stays within the bound less H there. That is a 0/1 program (it contains the knapsack
problem: a two-step plan is one window), solved exactly by HiGHS' branch and bound (``scipy.optimize.milp``, gap
0) within a time limit; a run that stops at the limit returns the best plan found, marked ``"optimal": false``
with its proven gap in the provenance. The result is checked against the exact replay of the engine's accounting
before it is returned, so the bound always holds exactly.

With step reuse allowed (``step_reuse``), the fit may also turn steps that reuse nearly every unit into whole-step
reuses, which keep only H: every subset of those candidate steps is a plan fitted as above, and the best is kept
(:func:`_fit_with_step_reuse`).
"""

from __future__ import annotations

import logging
import re

import numpy as np

from .cache_footprint import CacheFootprint, ReuseLayout, peak_cache_bytes, replay_peak, reuse_layout
from .families import get_family
from .plan import CachePlan


logger = logging.getLogger(__name__)

# Seconds of branch and bound per fit. FLUX.1-dev's books fit in about a second when the bound leaves room for the
# entries of highest FLOPs per byte; a tight bound on the Fast book stops at the limit, within 1% of the bound.
DEFAULT_TIME_LIMIT = 30.0
# Candidate steps of the step-reuse fit: every subset of them is considered (2^12 unbounded speedups, milliseconds).
MAX_STEP_CANDIDATES = 12
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class MemoryBoundError(ValueError):
    """The bound is below what every fitted version of the plan needs (H, which the step cache keeps)."""


def parse_size(text) -> int:
    """``"1.5GB"`` (10^9 bytes), ``"1.5GiB"`` (2^30), ``"800MB"``, ``"30MiB"``, ``"123456"`` (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]i?b|b)?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise ValueError(f"A memory size is a number with an optional unit (B, MB, GB, MiB, GiB), got {text!r}.")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if not value >= 0 or value != value:
        raise ValueError(f"A memory size must be >= 0, got {text!r}.")
    return int(value)


def fit_memory(
    plan: CachePlan,
    footprint: CacheFootprint,
    flops,
    max_cache_bytes: int,
    cache_dtype: str | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
    step_reuse: float | None = None,
) -> CachePlan:
    """A copy of ``plan`` whose peak cache memory on the footprint's config is at most ``max_cache_bytes``, computing
    the reused entries of least total FLOPs (``flops``: the :class:`~invardiff.flops.FlopProfile` of the same
    config) needed for that; ``plan`` itself when it already fits.

    ``cache_dtype`` sets the fitted plan's cache storage dtype (``engine/storage.py``; default: the plan's own).
    ``step_reuse`` (a fraction in (0, 1]; default None: off) also lets the fit turn executed steps whose unit reuses
    cover at least that fraction of the step's unit FLOPs into whole-step reuses (the step cache: only H is kept,
    the step costs its head); the set of such steps and the reuses dropped beside them are chosen together for the
    greatest FLOP-ideal speedup within the bound (:func:`_fit_with_step_reuse`).
    Raises :class:`MemoryBoundError` when the bound is below what the plan needs with no unit reuse at all (the
    H its step cache keeps), and ``NotImplementedError`` for plans that extrapolate reused units.
    """
    if not isinstance(max_cache_bytes, (int, np.integer)) or isinstance(max_cache_bytes, bool) or max_cache_bytes < 0:
        raise ValueError(f"max_cache_bytes must be an integer >= 0, got {max_cache_bytes!r}.")
    dtype = cache_dtype if cache_dtype is not None else plan.cache_dtype
    if dtype != plan.cache_dtype:
        plan = _with(plan, plan.module_reuse, plan.provenance, dtype)
    if step_reuse is not None:
        return _fit_with_step_reuse(plan, footprint, flops, max_cache_bytes, time_limit, step_reuse)
    return _fit_reuses(plan, footprint, flops, max_cache_bytes, time_limit)


def _fit_reuses(plan: CachePlan, footprint: CacheFootprint, flops, max_cache_bytes: int, time_limit: float):
    """:func:`fit_memory` without step conversion, the plan already in its cache dtype."""
    from .stats import ideal_speedup, plan_flops

    dtype = plan.cache_dtype
    before = peak_cache_bytes(plan, footprint)  # also refuses unit extrapolation
    layout = reuse_layout(plan, footprint, dtype)
    sizes = footprint.unit_bytes(dtype)
    needed = int(layout.hidden_after.max(initial=0))
    if max_cache_bytes < needed:
        raise MemoryBoundError(
            f"No fitted plan keeps its cache within {_show(max_cache_bytes)} on {footprint.config_name}: its step "
            f"cache alone keeps {_show(needed)} (H{'' if dtype is None else ' as ' + dtype}), which computing reused "
            f"units cannot lower. Give a bound of at least {needed} bytes, or a narrower cache_dtype."
        )
    if before <= max_cache_bytes:
        return plan
    savings = _unit_flops(footprint, flops)
    keep, report = fit_layout(layout, footprint.order, sizes, savings, max_cache_bytes, time_limit)
    dropped = layout.reuse & ~keep
    fitted = _drop_reuses(plan, footprint, dropped, dtype)
    after = peak_cache_bytes(fitted, footprint)
    if after > max_cache_bytes:  # fit_layout checked the same replay; this guards the plan rewrite
        raise RuntimeError(f"fitted plan holds {after} bytes, above the bound {max_cache_bytes}.")
    fitted.provenance = {
        **plan.provenance,
        "memory_fit": {
            "max_cache_bytes": int(max_cache_bytes),
            "model_config": footprint.config_name,
            "cache_dtype": dtype,
            "peak_cache_bytes": {"before": int(before), "after": int(after)},
            "ideal_speedup": {
                "before": ideal_speedup(plan, flops),
                "after": ideal_speedup(fitted, flops),
                # No fitted plan is faster (the FLOPs it must drop at least, report["flops_dropped_lower_bound"]).
                "bound": plan.num_inference_steps
                * flops.full_step
                / (plan_flops(plan, flops) + report["flops_dropped_lower_bound"]),
            },
            "reuses_dropped": int(dropped.sum()),
            **report,
        },
    }
    return fitted


def step_reuse_candidates(plan: CachePlan, footprint: CacheFootprint, flops, min_fraction: float) -> list[int]:
    """Executed steps after the first whose unit reuses cover at least ``min_fraction`` of the step's unit FLOPs
    (and some): the steps :func:`fit_memory` may turn into whole-step reuses."""
    layout = reuse_layout(plan, footprint)
    savings = _unit_flops(footprint, flops)
    covered = layout.reuse.astype(np.float64) @ savings
    total = float(savings.sum())
    return [
        t for t in range(1, plan.num_inference_steps) if layout.executed[t] and 0 < covered[t] >= min_fraction * total
    ]


def _fit_with_step_reuse(
    plan: CachePlan, footprint: CacheFootprint, flops, max_cache_bytes: int, time_limit: float, min_fraction: float
) -> CachePlan:
    """The best of every subset of the candidate steps turned into step reuses, each fitted exactly by
    :func:`_fit_reuses`. Subsets go by their unbounded speedup, highest first, and the search stops at the first
    whose unbounded speedup is no better than the best fitted one (no later subset can beat it), so the result is
    the optimum over (candidate steps converted, reuses dropped) when every fit it ran was optimal; the provenance
    records a proven upper bound otherwise."""
    from .stats import ideal_speedup

    if not 0 < min_fraction <= 1:
        raise ValueError(f"step_reuse must be a fraction in (0, 1] of a step's unit FLOPs, got {min_fraction!r}.")
    if plan.step_extrapolation_order().any():
        raise NotImplementedError(
            "fit-memory with step reuse does not convert steps of plans that extrapolate the step cache (their "
            "extrapolation pairs depend on which steps compute); fit without step reuse."
        )
    candidates = step_reuse_candidates(plan, footprint, flops, min_fraction)
    if len(candidates) > MAX_STEP_CANDIDATES:
        raise ValueError(
            f"{len(candidates)} steps reuse at least {min_fraction:g} of their unit FLOPs, more than the "
            f"{MAX_STEP_CANDIDATES} whose subsets the fit searches; give a larger step-reuse fraction."
        )
    before_peak, before_speed = peak_cache_bytes(plan, footprint), ideal_speedup(plan, flops)
    options = []
    for mask in range(2 ** len(candidates)):
        steps = [t for i, t in enumerate(candidates) if mask >> i & 1]
        converted = _reuse_steps(plan, steps)
        options.append((ideal_speedup(converted, flops), steps, converted))
    options.sort(key=lambda option: (-option[0], len(option[1])))  # ties: fewer steps converted
    best, best_speed, proven, optimal, fits, needed = None, 0.0, 0.0, True, 0, None
    for upper, steps, converted in options:
        if best is not None and upper <= best_speed:
            break  # this and every later subset is at most best_speed even unbounded
        try:
            fitted = _fit_reuses(converted, footprint, flops, max_cache_bytes, time_limit)
        except MemoryBoundError as error:
            needed = needed or error
            continue
        fits += 1
        record = fitted.provenance.get("memory_fit", {})
        speed = ideal_speedup(fitted, flops)
        proven = max(proven, record.get("ideal_speedup", {}).get("bound", speed))
        optimal &= record.get("optimal", True)
        if best is None or speed > best_speed:
            best, best_speed, best_steps = fitted, speed, steps
    if best is None:
        raise needed
    if not best_steps and best is plan:
        return plan
    record = dict(best.provenance.get("memory_fit", {}))
    record.update(
        {
            "max_cache_bytes": int(max_cache_bytes),
            "model_config": footprint.config_name,
            "cache_dtype": plan.cache_dtype,
            "peak_cache_bytes": {"before": int(before_peak), "after": int(peak_cache_bytes(best, footprint))},
            "ideal_speedup": {
                "before": before_speed,
                "after": float(best_speed),
                "bound": float(max(proven, best_speed)),
            },
            "reuses_dropped": int(record.get("reuses_dropped", 0)),
            "optimal": bool(optimal),
            "step_reuse": {"min_fraction": min_fraction, "candidates": candidates, "converted": best_steps},
            "subsets_fitted": fits,
        }
    )
    best.provenance = {**plan.provenance, "memory_fit": record}
    return best


def _reuse_steps(plan: CachePlan, steps: list[int]) -> CachePlan:
    """``plan`` with ``steps`` turned into whole-step reuses (their unit rows cleared: nothing runs there)."""
    if not steps:
        return plan
    converted = _with(plan, plan.module_reuse, plan.provenance, plan.cache_dtype)
    converted.step_cache[steps] = True
    for kinds in converted.module_reuse.values():
        for matrix in kinds.values():
            matrix[steps] = False
    return converted


def fit_layout(
    layout: ReuseLayout,
    order,
    sizes: np.ndarray,
    savings: np.ndarray,
    max_bytes: int,
    time_limit: float = DEFAULT_TIME_LIMIT,
) -> tuple[np.ndarray, dict]:
    """The reuses to keep, ``(T, U)`` within ``layout.reuse``, of maximum total ``savings[u]`` whose replayed peak
    (``sizes[u]`` bytes per unit, execution ``order``) is at most ``max_bytes``; and a report (``optimal``,
    ``mip_gap``, ``flops_dropped``). ``max_bytes`` must be at least the layout's H."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    reuse = layout.reuse
    U = reuse.shape[1]
    position = np.empty(U, dtype=np.int64)
    position[np.asarray(order)] = np.arange(U)
    executed = np.flatnonzero(layout.executed)
    index_of_step = {int(t): i for i, t in enumerate(executed)}
    steps, units = np.nonzero(reuse)
    keys = np.array([index_of_step[int(t)] * U + position[u] for t, u in zip(steps, units, strict=True)])
    by_key = np.argsort(keys)
    steps, units, keys = steps[by_key], units[by_key], keys[by_key]
    weights = sizes[units].astype(np.float64)
    values = savings[units].astype(np.float64)
    rows = _windows(layout, executed, U, max_bytes)
    starts = np.searchsorted(keys, np.fromiter(rows, np.int64), side="left")
    ends = np.searchsorted(keys, np.fromiter(rows, np.int64) + U, side="left")
    limits = np.array(list(rows.values()), dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(weights)])
    binding = cumulative[ends] - cumulative[starts] > limits  # a window whose every entry fits constrains nothing
    starts, ends, limits = starts[binding], ends[binding], limits[binding]
    scale = float(weights.max(initial=1.0))
    indptr = np.concatenate([[0], np.cumsum(ends - starts)])
    columns = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)] or [np.zeros(0, int)])
    keep = np.ones(len(keys), dtype=bool)
    report = {"optimal": True, "mip_gap": 0.0, "solution": "all"}
    if len(limits):
        matrix = csr_matrix((weights[columns] / scale, columns, indptr), shape=(len(limits), len(keys)))
        margin = 0.0
        for _ in range(4):  # HiGHS' feasibility tolerance is relative: tighten until the exact replay agrees
            result = milp(
                -values,
                constraints=LinearConstraint(matrix, -np.inf, limits / scale - margin),
                integrality=np.ones(len(keys)),
                bounds=Bounds(0, 1),
                options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "disp": False},
            )
            if result.x is None:
                raise RuntimeError(f"the memory fit found no plan within {time_limit:g} s ({result.message}).")
            keep = result.x > 0.5
            if _replay(layout, steps[keep], units[keep], order, sizes) <= max_bytes:
                break
            margin = max(2 * margin, 1e-9 * len(keys))
        else:
            raise RuntimeError("the memory fit's solutions kept exceeding the bound by rounding; report this.")
        report = {"optimal": bool(result.status == 0), "solution": "branch and bound"}
        if result.status != 0:
            # Stopped at the time limit: HiGHS' incumbent can be far from the optimum on these many near-identical
            # knapsack rows, so the greedy fill competes, and the better of the two is kept.
            greedy = _greedy(starts, ends, limits, weights, values)
            if values[greedy].sum() > values[keep].sum() and (
                _replay(layout, steps[greedy], units[greedy], order, sizes) <= max_bytes
            ):
                keep, report["solution"] = greedy, "greedy"
            logger.warning(
                "memory fit stopped at the %g s time limit; kept the %s solution", time_limit, report["solution"]
            )
    kept = np.zeros_like(reuse)
    kept[steps[keep], units[keep]] = True
    report["flops_dropped"] = float(values[~keep].sum())
    report["flops_dropped_lower_bound"] = _dropped_lower_bound(keys, weights, values, rows, U)
    return kept, report


def _greedy(starts, ends, limits, weights, values) -> np.ndarray:
    """A feasible subset: entries by FLOPs per byte (ties: earlier first, so that consecutive steps keep the same
    units and the windows across a step boundary hold no more than the step's own), each kept when every window
    containing it still has room."""
    count = len(weights)
    keep = np.zeros(count, dtype=bool)
    room = limits.copy()
    containing = [[] for _ in range(count)]
    for row, (a, b) in enumerate(zip(starts, ends, strict=True)):
        for entry in range(a, b):
            containing[entry].append(row)
    for entry in np.argsort(-values / np.maximum(weights, 1.0), kind="stable"):
        rows = containing[entry]
        if all(room[r] >= weights[entry] for r in rows):
            keep[entry] = True
            for r in rows:
                room[r] -= weights[entry]
    return keep


def _dropped_lower_bound(keys, weights, values, rows: dict[int, float], U: int) -> float:
    """FLOPs every fitted plan drops at least: the windows that cover one whole executed step (``i * U``) hold
    disjoint entries, so the FLOPs kept are at most the sum of their fractional knapsack optima (greedy by FLOPs per
    byte, the last entry cut). Within a few tenths of a percent of the optimum on FLUX.1-dev's books, it bounds
    the result when the branch and bound stops at its time limit."""
    dropped = 0.0
    for start, limit in rows.items():
        if start % U:
            continue
        inside = (keys >= start) & (keys < start + U)
        w, v = weights[inside], values[inside]
        if w.sum() <= limit:
            continue
        ratio = np.argsort(-v / np.maximum(w, 1.0), kind="stable")
        room, kept = max(limit, 0.0), 0.0
        for j in ratio:
            take = min(1.0, room / w[j]) if w[j] > 0 else 1.0
            kept += take * v[j]
            room -= take * w[j]
            if room <= 0:
                break
        dropped += float(v.sum()) - kept
    return dropped


def _windows(layout: ReuseLayout, executed: np.ndarray, U: int, max_bytes: int) -> dict[int, float]:
    """Every event of a run as the window of entry keys it covers (start key; ``U`` long) and the bytes left for
    units there (the bound less the H then kept), the smallest per window."""
    hidden = layout.hidden_after
    rows: dict[int, float] = {}

    def add(start: int, held_hidden: int) -> None:
        rows[start] = min(rows.get(start, np.inf), float(max_bytes - held_hidden))

    for i, t in enumerate(executed):
        before = int(hidden[t - 1]) if t > 0 else 0
        for q in range(U):  # after the unit at execution position q ran at step t
            add(i * U + q + 1, before)
        add((i + 1) * U, int(hidden[t]))  # after the head of t
        stop = executed[i + 1] if i + 1 < len(executed) else len(hidden)
        for c in range(t + 1, stop):  # step-cached steps: only their head runs
            add((i + 1) * U, int(hidden[c]))
    return rows


def _replay(layout: ReuseLayout, steps, units, order, sizes) -> int:
    reuse = np.zeros_like(layout.reuse)
    reuse[steps, units] = True
    return replay_peak(ReuseLayout(reuse, layout.executed, layout.hidden_after), order, sizes)


def _unit_flops(footprint: CacheFootprint, flops) -> np.ndarray:
    return np.array([float(flops.units[block_list][name][layer]) for block_list, layer, name in footprint.units])


def _drop_reuses(plan: CachePlan, footprint: CacheFootprint, dropped: np.ndarray, cache_dtype) -> CachePlan:
    family = get_family(plan.model.family)
    module_reuse = _copy_reuse(plan.module_reuse)
    for index, (block_list, layer, name) in enumerate(footprint.units):
        steps = np.flatnonzero(dropped[:, index])
        if not len(steps):
            continue
        spec = family.block_list(block_list)
        # computing one unit must not change another's decisions
        spec.check_kinds_unshared("fit-memory drops reuses per unit and cannot fit such a plan")
        unit = next(u for u in spec.units if u.name == name)
        for kind in unit.kinds:
            module_reuse[block_list][kind][steps, layer] = False
    return _with(plan, module_reuse, plan.provenance, cache_dtype)


def _copy_reuse(module_reuse):
    return {name: {kind: m.copy() for kind, m in kinds.items()} for name, kinds in module_reuse.items()}


def _with(plan: CachePlan, module_reuse, provenance, cache_dtype) -> CachePlan:
    return CachePlan(
        plan.model,
        plan.num_inference_steps,
        plan.step_cache.copy(),
        _copy_reuse(module_reuse),
        plan.scheduler,
        dict(provenance),
        dict(plan.written_by),
        plan.step_extrapolation,
        plan.unit_extrapolation,
        cache_dtype,
        plan.step_extrapolation2,
    )


def _show(size: int) -> str:
    return f"{size} bytes ({size / 2**30:.3f} GiB)" if size >= 2**20 else f"{size} bytes"
