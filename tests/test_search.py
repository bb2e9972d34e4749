"""Budgeted plan search on hand-made trajectories: budget met exactly, enumerated optima found, coefficients equal
the least-squares solution written here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from invardiff.calibration.budget import (
    _verified,
    descend,
    refined_best,
    refined_plan,
    sampled_last_step_fill,
    unit_setting,
)
from invardiff.calibration.search import BudgetError, SearchConfig, parse_budget, schedule_plan, search_plan
from invardiff.calibration.trajectory import TrajectoryRecorder, TrajectoryStats
from invardiff.flops import FlopProfile
from invardiff.plan import ModelFacts
from invardiff.stats import extrapolation_work, ideal_speedup, plan_flops, unit_reuse

import toy_family  # noqa: F401  (registers the "toy" family)


FULL, CACHED, ATTN, FF = 10.0, 1.0, 3.0, 2.0  # FLOPs of a step, a step-cached step, and the units' reuse savings


def toy_flops(layers: int = 1) -> FlopProfile:
    units = {"blocks": {"attn": np.full(layers, ATTN), "ff": np.full(layers, FF)}}
    return FlopProfile("toy-hand", "toy", {"blocks": layers}, FULL, CACHED, units)


def stats_from(features: dict[str, np.ndarray], window: int, layers: int = 1) -> TrajectoryStats:
    """Gram matrices of hand-made trajectories ``{stream: (samples, T, N)}``, written out directly."""
    T = next(iter(features.values())).shape[1]
    gram = {}
    for name, f in features.items():
        matrix = np.zeros((T, window + 1))
        for t in range(T):
            for lag in range(min(t, window) + 1):
                matrix[t, lag] = np.sum(f[:, t] * f[:, t - lag])
        gram[name] = matrix
    sizes = {name: f.shape[2] for name, f in features.items()}
    facts = ModelFacts.for_family("toy", {"blocks": layers})
    return TrajectoryStats(facts, T, window, gram, sizes, next(iter(features.values())).shape[0])


def random_trajectories(T: int, seed: int, layers: int = 1, samples: int = 2, n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def walk():  # a smooth random trajectory with uneven steps, so that the optimum is not trivial
        steps = rng.normal(size=(samples, T, n)) * rng.uniform(0.05, 1.0, size=(1, T, 1))
        return 3.0 + np.cumsum(steps, axis=1)

    features = {"step": walk()}
    for layer in range(layers):
        features[f"blocks.{layer}.attn"] = walk()
        features[f"blocks.{layer}.ff"] = walk()
    return features


def direct_error(f: np.ndarray, h: np.ndarray, computed: list[int], t: int, extrapolate: bool) -> float:
    """Relative error of stream ``f`` reused at ``t`` (RMS over H's RMS), computed from the features themselves."""
    earlier = [s for s in computed if s < t]
    a = earlier[-1]
    residual = f[:, t] - f[:, a]
    if extrapolate and len(earlier) >= 2:
        delta = f[:, a] - f[:, earlier[-2]]
        c = np.linalg.lstsq(delta.reshape(-1, 1), residual.reshape(-1), rcond=None)[0][0]
        residual = residual - c * delta
    return math.sqrt(np.mean(residual**2) / np.mean(h[:, t] ** 2))


@pytest.mark.parametrize("speedup", [1.5, 2.0, 2.5, 3.0, 3.3])
def test_search_meets_the_budget_within_one_step(speedup):
    stats = stats_from(random_trajectories(16, seed=1, layers=2), window=5, layers=2)
    flops = toy_flops(2)
    result = search_plan(stats, flops, SearchConfig(speedup, warmup_steps=2))
    budget = 16 * FULL / speedup
    assert result.ideal_speedup >= speedup
    assert budget - (FULL - CACHED) <= plan_flops(result.plan, flops) <= budget
    assert result.ideal_speedup == pytest.approx(ideal_speedup(result.plan, flops))
    assert not result.plan.step_cache[:2].any() and not result.plan.step_cache[-1]  # warm-up and last step compute


@pytest.mark.parametrize("extrapolate", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_schedule_is_the_enumerated_optimum(seed, extrapolate):
    T, window = 9, 8
    features = random_trajectories(T, seed)
    stats = stats_from(features, window)
    speedup = 2.0
    result = search_plan(stats, toy_flops(), SearchConfig(speedup, reuse_units=False, extrapolate_steps=extrapolate))
    budget = T * FULL / speedup
    best = (math.inf, None)
    for reused in itertools.product([False, True], repeat=T - 2):  # steps 1 .. T-2; 0 and T-1 compute
        computed = [0] + [t for t, r in zip(range(1, T - 1), reused, strict=True) if not r] + [T - 1]
        flops = len(computed) * FULL + (T - len(computed)) * CACHED
        if not budget - (FULL - CACHED) <= flops <= budget:
            continue
        error = sum(
            direct_error(features["step"], features["step"], computed, t, extrapolate)
            for t in range(T)
            if t not in computed
        )
        best = min(best, (error, computed), key=lambda pair: pair[0])
    assert result.error == pytest.approx(best[0], rel=1e-9)
    assert np.flatnonzero(~result.plan.step_cache).tolist() == best[1]


@pytest.mark.parametrize("seed", [0, 3])
def test_steps_and_one_unit_jointly_match_enumeration(seed):
    # One block, attention the only unit worth reusing (ff saves nothing), T = 6: every step schedule and every
    # set of attention reuses on the computed steps is enumerated.
    T = 6
    features = random_trajectories(T, seed)
    stats = stats_from(features, window=5)
    flops = toy_flops()
    flops.units["blocks"]["ff"][:] = 0.0
    speedup = 1.3
    result = search_plan(stats, flops, SearchConfig(speedup))
    budget = T * FULL / speedup
    best = math.inf
    for reused in itertools.product([False, True], repeat=T - 2):
        computed = [0] + [t for t, r in zip(range(1, T - 1), reused, strict=True) if not r] + [T - 1]
        eligible = [s for s in computed if 0 < s < T - 1]
        step_error = sum(
            direct_error(features["step"], features["step"], computed, t, False) for t in range(T) if t not in computed
        )
        for unit_reused in itertools.product([False, True], repeat=len(eligible)):
            reuses = [s for s, r in zip(eligible, unit_reused, strict=True) if r]
            total = len(computed) * FULL + (T - len(computed)) * CACHED - ATTN * len(reuses)
            if not budget - (FULL - CACHED) <= total <= budget:
                continue
            unit_computed = [s for s in computed if s not in reuses]
            attn = features["blocks.0.attn"]
            unit_error = sum(direct_error(attn, features["step"], unit_computed, s, False) for s in reuses)
            best = min(best, step_error + unit_error)
    assert result.error == pytest.approx(best, rel=1e-9)


def test_fitted_coefficients_equal_the_least_squares_solution():
    T = 10
    features = random_trajectories(T, seed=5, samples=3)
    stats = stats_from(features, window=4)
    result = search_plan(stats, toy_flops(), SearchConfig(2.0, extrapolate_steps=True, extrapolate_units=True))
    plan = result.plan
    computed = np.flatnonzero(~plan.step_cache).tolist()
    h = features["step"]
    for t in np.flatnonzero(plan.step_cache):
        earlier = [s for s in computed if s < t]
        a, p = earlier[-1], earlier[-2]
        if t - p > 4:  # outside the recorded window: plain reuse
            assert plan.step_extrapolation[t] == 0.0
            continue
        delta, target = (h[:, a] - h[:, p]).reshape(-1, 1), (h[:, t] - h[:, a]).reshape(-1)
        expected = np.linalg.lstsq(delta, target, rcond=None)[0][0]  # pooled over the three samples
        assert plan.step_extrapolation[t] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    reuse = unit_reuse(plan, "blocks")
    for unit in ("attn", "ff"):
        f = features[f"blocks.0.{unit}"]
        unit_computed = [s for s in computed if not reuse[unit][s, 0]]
        for s in computed:
            if not reuse[unit][s, 0]:
                assert plan.unit_extrapolation["blocks"][unit][s, 0] == 0.0
                continue
            earlier = [u for u in unit_computed if u < s]
            if len(earlier) < 2 or s - earlier[-2] > 4:  # no two values inside the window: plain reuse
                assert plan.unit_extrapolation["blocks"][unit][s, 0] == 0.0
                continue
            delta, target = (f[:, earlier[-1]] - f[:, earlier[-2]]).reshape(-1, 1), (f[:, s] - f[:, earlier[-1]])
            expected = np.linalg.lstsq(delta, target.reshape(-1), rcond=None)[0][0]
            assert plan.unit_extrapolation["blocks"][unit][s, 0] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert (plan.step_extrapolation != 0).any()


def test_extrapolation_never_increases_the_calibration_error():
    stats = stats_from(random_trajectories(14, seed=7, layers=2), window=5, layers=2)
    for speedup in (1.8, 2.5, 3.0):
        plain = search_plan(stats, toy_flops(2), SearchConfig(speedup))
        both = search_plan(stats, toy_flops(2), SearchConfig(speedup, extrapolate_steps=True, extrapolate_units=True))
        assert both.error <= plain.error + 1e-12


def test_out_of_reach_budget_names_the_fastest_reachable_speedup():
    stats = stats_from(random_trajectories(8, seed=0), window=2)
    with pytest.raises(BudgetError, match="out of reach"):
        search_plan(stats, toy_flops(), SearchConfig(7.0, max_run=2))


def test_parse_budget():
    assert parse_budget("2.5x") == 2.5 and parse_budget(" 3 ") == 3.0
    with pytest.raises(ValueError, match="speedup"):
        parse_budget("fast")
    with pytest.raises(ValueError, match=">= 1"):
        parse_budget("0.5x")


def test_recorder_gram_equals_the_features_inner_products(tmp_path):
    # The recorder as the engine drives it, on hand-made features: three samples, T = 5, window 2.
    T, window = 5, 2
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, T, 4, 2)).astype(np.float32)
    unit = rng.normal(size=(3, T, 6)).astype(np.float32)
    facts = ModelFacts.for_family("toy", {"blocks": 1})
    from invardiff.engine.state import UnitRef

    recorder = TrajectoryRecorder([UnitRef("blocks", 0, "attn", ("attn",))], facts, T, window)

    class State:
        name = "default"

    state = State()
    for t in range(T):
        state.step = t
        recorder.on_unit(state, 0, torch.from_numpy(unit[:, t]))
        recorder.on_hidden(state, torch.from_numpy(hidden[:, t]))
    stats = recorder.stats()
    expected = stats_from(
        {"step": hidden.reshape(3, T, 8).astype(np.float64), "blocks.0.attn": unit.astype(np.float64)}, window
    )
    for name in ("step", "blocks.0.attn"):
        np.testing.assert_allclose(stats.gram[name], expected.gram[name], rtol=1e-12)
    assert stats.num_samples == 3 and stats.sizes == {"step": 8, "blocks.0.attn": 6}
    stats.save(tmp_path / "t.npz")
    loaded = TrajectoryStats.load(tmp_path / "t.npz")
    assert loaded.window == window and np.array_equal(loaded.gram["step"], stats.gram["step"])


def toy_footprint(layers: int = 2):
    """Hand-made cache sizes of the toy: attn outputs 40 bytes, ff outputs 24, H 16 (float32 elements)."""
    from invardiff.cache_footprint import CacheFootprint

    units = tuple(("blocks", layer, name) for layer in range(layers) for name in ("attn", "ff"))
    tensors = tuple(((10 if name == "attn" else 6, torch.float32),) for _, _, name in units)
    return CacheFootprint("toy-hand", units, tensors, tuple(range(len(units))), (4, torch.float32))


@pytest.mark.parametrize("bound", [40, 56])
def test_memory_bounded_search_meets_budget_and_bound(bound):
    from invardiff.cache_footprint import peak_cache_bytes
    from invardiff.calibration.search import MemoryBound

    stats = stats_from(random_trajectories(16, seed=1, layers=2), window=5, layers=2)
    flops, footprint = toy_flops(2), toy_footprint(2)
    speedup = 2.5
    free = search_plan(stats, flops, SearchConfig(speedup, warmup_steps=2)).plan
    assert peak_cache_bytes(free, footprint) == 96 > bound  # the unbounded plan keeps two attn outputs and H
    result = search_plan(stats, flops, SearchConfig(speedup, warmup_steps=2, memory=MemoryBound(bound, footprint)))
    assert result.ideal_speedup >= speedup
    assert peak_cache_bytes(result.plan, footprint) <= bound
    assert result.plan.provenance["search"]["speedup"] == speedup
    assert result.plan.provenance["search"]["max_cache_bytes"] == bound
    with pytest.raises(BudgetError, match="its step cache alone keeps 16 bytes"):
        search_plan(stats, flops, SearchConfig(speedup, warmup_steps=2, memory=MemoryBound(15, footprint)))


def test_memory_bound_cache_dtype_refuses_extrapolation():
    from invardiff.calibration.search import MemoryBound

    with pytest.raises(ValueError, match="cache_dtype does not go with extrapolation"):
        SearchConfig(2.0, extrapolate_steps=True, memory=MemoryBound(100, toy_footprint(), "bfloat16"))


@pytest.mark.parametrize("speedup", [2.0, 2.3])
def test_extrapolating_plans_meet_the_budget_with_their_lerps_counted(speedup):
    # A lerp of H costs 0.15 of a full step and a unit's 0.06 (elements x LERP_FLOPS): on a small model they are
    # not negligible, and the FLOP-ideal speedup counts them, so the search must too.
    stats = stats_from(random_trajectories(16, seed=1, layers=2), window=5, layers=2)
    flops = toy_flops(2)
    flops.step_elements = 0.5
    flops.unit_elements = {"blocks": {"attn": np.full(2, 0.2), "ff": np.full(2, 0.2)}}
    config = SearchConfig(speedup, warmup_steps=2, extrapolate_steps=True, extrapolate_units=True)
    result = search_plan(stats, flops, config)
    assert extrapolation_work(result.plan, flops)["flops"] > 0  # the case at hand: the plan extrapolates
    assert ideal_speedup(result.plan, flops) >= speedup
    assert plan_flops(result.plan, flops) <= 16 * FULL / speedup


@pytest.mark.parametrize("extrapolate", [False, True])
def test_schedule_plan_rebuilds_the_searched_plan_from_its_computed_steps(extrapolate):
    stats = stats_from(random_trajectories(16, seed=1, layers=2), window=5, layers=2)
    config = SearchConfig(2.5, warmup_steps=2, extrapolate_steps=extrapolate, extrapolate_units=extrapolate)
    searched = search_plan(stats, toy_flops(2), config)
    computed = np.flatnonzero(~searched.plan.step_cache).tolist()
    rebuilt = schedule_plan(stats, toy_flops(2), config, computed)
    assert rebuilt.plan == searched.plan and rebuilt.error == pytest.approx(searched.error, rel=1e-12)
    assert schedule_plan(stats, toy_flops(2), config, [0, 1, 8, 15]) is None  # a run of 6 > the window of 5
    assert schedule_plan(stats, toy_flops(2), config, [0, 2, 8, 15]) is None  # step 1 is warm-up: it computes


def test_descent_on_sampled_error_reaches_the_enumerated_optimum():
    # A separable convex error over the positions of the computed steps (what sampling would return), T = 12:
    # the first-improvement descent from a bad schedule ends at the best of all schedules with as many steps.
    T, target = 12, (0, 1, 4, 7, 9, 11)

    def error_of(schedule):
        return float(sum((s - t) ** 2 for s, t in zip(schedule, target, strict=True)))

    start = (0, 1, 2, 3, 5, 11)
    best, history = descend(start, error_of, warmup=2, T=T, rounds=100)
    enumerated = min(((0, 1, *middle, T - 1) for middle in itertools.combinations(range(2, T - 1), 3)), key=error_of)
    assert best == enumerated == target
    assert [error for _, error in history] == sorted((error for _, error in history), reverse=True)
    one, moves = descend(start, error_of, warmup=2, T=T, rounds=1)
    assert len(moves) == 2 and error_of(one) < error_of(start)  # one round: one accepted move


def test_last_step_units_fill_the_budget_at_the_last_step_only():
    # T = 8, computed [0, 3, 7]: 3 * 10 + 5 * 1 = 35 FLOPs; 2.5x allows 32, so 3 more FLOPs must come from unit reuse.
    # One unit stream (attn, 3 FLOPs): the default search reuses it at step 3 (from step 0), last_step_units at step 7
    # (from step 3), with the error written here from the features (relative RMS over H's at that step).
    features = random_trajectories(8, seed=6)
    del features["blocks.0.ff"]  # the search only reuses units whose trajectories it has
    stats = stats_from(features, window=5)
    h, f = features["step"], features["blocks.0.attn"]

    def reused_at(result) -> list[int]:
        executed = ~result.plan.step_cache
        return np.flatnonzero(unit_reuse(result.plan, "blocks")["attn"][:, 0] & executed).tolist()

    default = schedule_plan(stats, toy_flops(), SearchConfig(2.5), [0, 3, 7])
    last = schedule_plan(stats, toy_flops(), SearchConfig(2.5, last_step_units=True), [0, 3, 7])
    assert reused_at(default) == [3] and reused_at(last) == [7]
    assert not unit_reuse(last.plan, "blocks")["ff"][~last.plan.step_cache].any()
    assert last.unit_error == pytest.approx(direct_error(f, h, [0, 3], 7, extrapolate=False), rel=1e-9)
    assert last.step_error == pytest.approx(default.step_error, rel=1e-12)
    assert ideal_speedup(last.plan, toy_flops()) == pytest.approx(2.5)
    assert last.plan.provenance["search"]["last_step_units"] is True
    assert "last_step_units" not in default.plan.provenance["search"]  # plans without it keep their provenance
    searched = search_plan(stats, toy_flops(), SearchConfig(2.5, last_step_units=True))
    assert reused_at(searched) in ([], [7]) and ideal_speedup(searched.plan, toy_flops()) >= 2.5
    with pytest.raises(ValueError, match="needs reuse_units=True"):
        SearchConfig(2.5, reuse_units=False, last_step_units=True)


@pytest.mark.parametrize(
    ("added", "chosen"), [({"attn": 0.9, "ff": 0.1}, ["ff", "attn"]), ({"attn": 0.3, "ff": 0.5}, ["attn"])]
)
def test_sampled_last_step_fill_takes_the_least_added_error_per_flop(added, chosen):
    # T = 8, computed [0, 3, 7] at 2.5x: 3 FLOPs of unit reuse at the last step are needed (attn saves 3, ff 2). A toy
    # sampled error adds a fixed amount per unit reused at the last step: per FLOP saved, ff first (0.05 < 0.3) does
    # not cover the need alone, so attn joins it; attn first (0.1 < 0.25) covers it alone.
    stats = stats_from(random_trajectories(8, seed=6), window=5)
    flops = toy_flops()

    def measure(plan) -> float:
        reuse = unit_reuse(plan, "blocks")
        return 1.0 + sum(added[unit] for unit in ("attn", "ff") if reuse[unit][7, 0])

    start = schedule_plan(stats, flops, SearchConfig(2.5, last_step_units=True), [0, 3, 7])
    result, streams = sampled_last_step_fill(stats, flops, start, measure)
    assert streams == [f"blocks.0.{unit}" for unit in chosen]
    fill = result.plan.provenance["search"]["last_step_fill"]
    assert fill["added_mse"] == pytest.approx({f"blocks.0.{unit}": value for unit, value in added.items()})
    assert fill["output_mse"] == pytest.approx(1.0 + sum(added[unit] for unit in chosen))
    assert np.flatnonzero(~result.plan.step_cache).tolist() == [0, 3, 7]
    assert ideal_speedup(result.plan, flops) >= 2.5


def longest_reused_run(plan) -> int:
    runs = "".join("1" if cached else "0" for cached in plan.step_cache).split("0")
    return max(len(run) for run in runs)


def test_verified_selection_samples_the_caps_of_4_and_5_at_targets_a_cap_of_3_cannot_reach():
    # T = 16, units off: a cap of 3 needs 5 computed steps (2.62x), caps of 4 and up reach 3x with 4 computed steps
    # (52 of the 53.3 FLOPs the budget allows). A toy sampled error that grows with the longest reused run keeps the
    # cap of 4, whose only 4-step schedule is [0, 5, 10, 15]; with the caps of 2, 3 and the window alone the
    # window's plan, with a longer run, was the only candidate.
    stats = stats_from(random_trajectories(16, seed=3), window=6)
    config = SearchConfig(3.0, reuse_units=False)
    for cap in (2, 3):
        with pytest.raises(BudgetError):
            search_plan(stats, toy_flops(), SearchConfig(3.0, max_run=cap, reuse_units=False))
    chosen = _verified(stats, toy_flops(), config, lambda plan: float(longest_reused_run(plan)))[0]
    candidates = chosen.plan.provenance["search"]["verified"]["candidates"]
    assert {c["max_run"] for c in candidates} >= {4, 6} and all(c["reuse_units"] is False for c in candidates)
    assert chosen.plan.provenance["search"]["max_run"] == 4
    assert np.flatnonzero(~chosen.plan.step_cache).tolist() == [0, 5, 10, 15]
    errors = [c["output_mse"] for c in candidates]
    assert chosen.plan.provenance["search"]["verified"]["output_mse"] == 4.0 == min(errors)


@pytest.mark.parametrize("extrapolation_samples_better", [True, False])
def test_verified_selection_samples_an_extrapolating_search_without_extrapolation_too(extrapolation_samples_better):
    # T = 16 at 2.5x, units off, reused steps extrapolated: every cap is searched with and without extrapolation and
    # each distinct plan sampled; a toy sampled error that charges plans with (or without) coefficients keeps the
    # other kind, whatever the additive model's own errors say. The candidates are the two kinds of the same caps.
    stats = stats_from(random_trajectories(16, seed=3), window=6)
    config = SearchConfig(2.5, reuse_units=False, extrapolate_steps=True)

    def measure(plan) -> float:
        charged = not plan.extrapolates if extrapolation_samples_better else plan.extrapolates
        return float(longest_reused_run(plan)) + (100.0 if charged else 0.0)

    chosen = _verified(stats, toy_flops(), config, measure)[0]
    assert chosen.plan.extrapolates is extrapolation_samples_better
    assert (chosen.plan.step_extrapolation is not None) is extrapolation_samples_better
    candidates = chosen.plan.provenance["search"]["verified"]["candidates"]
    kinds = {(c["max_run"], c["extrapolates"]) for c in candidates}
    assert {e for _, e in kinds} == {True, False} and len(kinds) == len(candidates)
    caps = {cap for cap, _ in kinds}
    assert kinds == {(cap, e) for cap in caps for e in (True, False)}  # both kinds of every cap that reaches 2.5x
    assert chosen.plan.provenance["search"]["verified"]["output_mse"] == min(c["output_mse"] for c in candidates)
    # A search that does not extrapolate is not tried with extrapolation.
    plain = _verified(stats, toy_flops(), SearchConfig(2.5, reuse_units=False), measure)[0]
    assert not any(c["extrapolates"] for c in plain.plan.provenance["search"]["verified"]["candidates"])


def test_refined_plan_moves_steps_into_runs_longer_than_the_kept_cap():
    # The kept plan was searched under a cap of 2 (2x, T = 16, units off: 7 computed steps); the toy sampled error
    # is the squared distance of the computed steps to a schedule with a run of 5 reused steps (10-14), inside the
    # window of 6. The descent must reach it: moves are judged by the sampled error, up to the recorded window,
    # whatever the cap the start was searched under.
    T, target = 16, (0, 2, 4, 6, 8, 9, 15)
    stats = stats_from(random_trajectories(T, seed=4), window=6)
    start = search_plan(stats, toy_flops(), SearchConfig(2.0, max_run=2, reuse_units=False))
    assert longest_reused_run(start.plan) <= 2 and int((~start.plan.step_cache).sum()) == len(target)

    def measure(plan) -> float:
        computed = np.flatnonzero(~plan.step_cache).tolist()
        return float(sum((s - t) ** 2 for s, t in zip(computed, target, strict=True)))

    refined = refined_plan(stats, toy_flops(), start, measure, rounds=100)
    assert np.flatnonzero(~refined.plan.step_cache).tolist() == list(target)
    assert longest_reused_run(refined.plan) == 5
    moves = refined.plan.provenance["search"]["refined"]["moves"]
    assert moves[0][0] == np.flatnonzero(~start.plan.step_cache).tolist() and tuple(moves[-1]) == (list(target), 0.0)
    errors = [error for _, error in moves]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)


def test_refine_descends_from_the_best_plan_of_each_unit_setting_and_keeps_the_lowest_end():
    # T = 16 at 2.2x with units on the computed steps, at the last step only and off (each setting's plans); a toy
    # sampled error: the squared distance of the computed steps to a target schedule plus a cost per unit setting that
    # favours the last step. Every setting's best candidate is a start, and the kept plan is the start whose descent
    # ends lowest, each descent the same as refined_plan from that start alone.
    T, target = 16, (0, 2, 5, 8, 11, 15)
    stats = stats_from(random_trajectories(T, seed=7), window=6)
    flops = toy_flops()
    offset = {"computed": 3.0, "last": 0.0, "off": 6.0}

    def measure(plan) -> float:
        computed = np.flatnonzero(~plan.step_cache).tolist()
        reuse = unit_reuse(plan, "blocks")
        executed = ~plan.step_cache
        rows = np.flatnonzero((reuse["attn"] | reuse["ff"]).any(axis=1) & executed)
        setting = "off" if rows.size == 0 else "last" if rows.tolist() == [T - 1] else "computed"
        distance = sum((s - t) ** 2 for s, t in zip(computed, target, strict=False)) + 10 * abs(len(computed) - 6)
        return float(distance + offset[setting])

    config = SearchConfig(2.2)
    starts = _verified(stats, flops, config, measure)
    settings = [unit_setting(start.plan.provenance["search"]) for start in starts]
    assert len(set(settings)) == len(settings) >= 2 and "last" in settings  # off may equal a plan with units
    errors = [start.plan.provenance["search"]["verified"]["output_mse"] for start in starts]
    assert errors == sorted(errors)
    chosen = refined_best(stats, flops, starts, measure, rounds=50)
    ends = {}
    for setting in settings:  # each descent alone, from a fresh selection
        alone = next(
            s for s in _verified(stats, flops, config, measure) if unit_setting(s.plan.provenance["search"]) == setting
        )
        fill = None
        if setting == "last":  # its fill is chosen on sampled error first, then kept while the steps move
            alone, fill = sampled_last_step_fill(stats, flops, alone, measure)
        refined = refined_plan(stats, flops, alone, measure, rounds=50, fill=fill)
        ends[setting] = refined.plan.provenance["search"]["refined"]["moves"][-1][1]
    recorded = {entry["units"]: entry["end_mse"] for entry in chosen.plan.provenance["search"]["refined"]["starts"]}
    assert recorded == ends
    assert measure(chosen.plan) == min(ends.values())
    assert unit_setting(chosen.plan.provenance["search"]) == min(ends, key=ends.get)


def test_descent_leaves_a_local_minimum_of_single_shifts_by_a_shift_of_two():
    # T = 8, schedules (0, x, 7): x = 2 is a local minimum of shifts by one (3 against 5 and 4); a shift by two
    # reaches x = 4, the enumerated optimum. Each schedule is measured once.
    errors = {1: 5.0, 2: 3.0, 3: 4.0, 4: 1.0, 5: 6.0, 6: 6.0}
    calls = []

    def error_of(schedule):
        calls.append(schedule)
        return errors[schedule[1]]

    stuck, _ = descend((0, 2, 7), error_of, warmup=1, T=8, rounds=10, reach=1)
    assert stuck == (0, 2, 7)
    calls.clear()
    best, history = descend((0, 2, 7), error_of, warmup=1, T=8, rounds=10)
    measured = list(calls)
    assert len(measured) == len(set(measured))
    assert best == (0, 4, 7) == min(((0, x, 7) for x in errors), key=error_of)
    assert [error for _, error in history] == [3.0, 1.0]


def test_refine_with_a_memory_bound_is_refused_before_any_sampling():
    # refined plans are rebuilt by schedule_plan, which does not fit them to the bound: the pair must be refused, and
    # before the recording pass (a pipeline that fails when called shows nothing ran).
    from invardiff.calibration.budget import calibrate_budget

    class Unused:
        def __call__(self, *args, **kwargs):
            raise AssertionError("the pipeline must not run")

    with pytest.raises(NotImplementedError, match="refine=2 moves computed steps without refitting"):
        calibrate_budget(
            Unused(),
            num_inference_steps=8,
            cases=[(0, 0)],
            speedups=[2.0],
            verify=True,
            refine=2,
            max_cache_bytes=10**6,
        )
