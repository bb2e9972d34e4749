"""Second-order extrapolation of reused steps (plan format version 4): ``H_a + c1 (H_a - H_p) + c2 (H_a - 2 H_p +
H_q)`` at run time (two nested lerps, counted as two), the least-squares fit on hand-made trajectories, the search
that rates a schedule at second order, the history of H the engine keeps, and the file format's refusals."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from sync_counter import count_host_syncs
from test_extrapolation import calls as extrapolation_calls
from test_extrapolation import toy
from test_search import random_trajectories, stats_from, toy_flops

import invardiff
from invardiff.cache_footprint import measure_footprint, peak_cache_bytes
from invardiff.calibration.budget import _same_plan, _settings_config, verify_grid
from invardiff.calibration.search import SearchConfig, schedule_plan, search_plan
from invardiff.calibration.trajectory import STEP_STREAM
from invardiff.families import get_family
from invardiff.flops import flop_counter
from invardiff.memory import cache_memory
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.plan import CachePlan, ModelFacts, PlanError
from invardiff.policies.extrapolation import StepExtrapolation, Triple, extrapolate, second_order_weights
from invardiff.stats import extrapolation_work

import toy_family  # noqa: F401  (registers the "toy" family)
from helpers import facts_for, plan_from_bits


T = 6
STEPS = "000110"  # steps 0-2 compute, 3 and 4 reuse step 2 (three computed states before them), 5 computes
FIRST = np.array([0.0, 0.0, 0.0, 0.6, 1.1, 0.0])
SECOND = np.array([0.0, 0.0, 0.0, 0.2, -0.3, 0.0])
# fp32: the two lerps' rounding; half types: the roundings of both lerps in the dtype, plus the head's.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def calls(dtype):
    return extrapolation_calls(dtype, T)


def run(transformer, plan, inputs):
    outputs = []
    with invardiff.enabled(transformer, plan):
        for step, call in enumerate(inputs):
            with invardiff.cache_context(transformer, "default", step_index=step):
                outputs.append(transformer(**call)[0])
    return outputs


def second_order_plan(transformer, first=FIRST, second=SECOND, steps=STEPS) -> CachePlan:
    plan = plan_from_bits(facts_for(transformer, "toy"), steps)
    return dataclasses.replace(plan, step_extrapolation=first, step_extrapolation2=second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_reused_steps_extrapolate_from_the_last_three_computed_states(dtype):
    transformer = toy(dtype)
    inputs = calls(dtype)
    captured = []
    handle = transformer.norm_out.register_forward_pre_hook(lambda m, args: captured.append(args[0].clone()))
    for call in inputs[:3]:
        transformer(**call)
    handle.remove()
    q, p, a = (h.double() for h in captured)
    expected = []
    for step in (3, 4):  # head(H_2 + c1 (H_2 - H_1) + c2 (H_2 - 2 H_1 + H_0)), in float64 then the model's dtype
        hidden = (a + FIRST[step] * (a - p) + SECOND[step] * (a - 2 * p + q)).to(dtype)
        expected.append(toy_family._run_head(transformer, hidden, inputs[step])[0])
    with count_host_syncs() as syncs:
        outputs = run(transformer, second_order_plan(transformer), inputs)
    rtol, atol = TOLERANCE[dtype]
    for got, want in zip(outputs[3:5], expected, strict=True):
        assert got.dtype == dtype and got.device == want.device
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert syncs.at("invardiff/policies/") == 0, syncs.report()
    first_only = run(transformer, second_order_plan(transformer, second=np.zeros(T)), inputs)
    assert not torch.allclose(outputs[3].float(), first_only[3].float(), atol=1e-3)  # the second order did something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_zero_second_order_coefficients_are_bit_identical_to_the_first_order_plan(dtype):
    transformer = toy(dtype)
    inputs = calls(dtype)
    zeros = second_order_plan(transformer, second=np.zeros(T))
    assert zeros.to_dict()["format_version"] == 4  # the field is there, so the file is version 4
    first = dataclasses.replace(zeros, step_extrapolation2=None)
    for got, want in zip(run(transformer, zeros, inputs), run(transformer, first, inputs), strict=True):
        assert torch.equal(got, want)


def test_the_nested_lerps_equal_the_second_order_formula():
    """Every nesting the weights may pick, including the coefficients where one or two of the three nestings'
    denominators vanish (c2 = 1; c1 + 2 c2 = -1; c1 + c2 = 0)."""
    generator = torch.Generator().manual_seed(1)
    q, p, a = (torch.randn(7, dtype=torch.float64, generator=generator) for _ in range(3))
    grid = [-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5]
    outers = set()
    for c1, c2 in itertools.product(grid, grid):
        weights = second_order_weights(c1, c2)
        outer, start, end, inner_weight, outer_weight = weights
        assert sorted((outer, start, end)) == [0, 1, 2] and abs(outer_weight) >= 2 / 3 - 1e-12
        outers.add(outer)
        got = extrapolate(Triple(q, p, a), c1, weights)
        want = a + c1 * (a - p) + c2 * (a - 2 * p + q)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert outers == {0, 1, 2}
    counter = flop_counter()
    with counter:
        extrapolate(Triple(q, p, a), 0.3, second_order_weights(0.3, 0.2))
    assert counter.get_total_flops() == 2 * 3 * 7  # two lerps of 3 FLOPs per element


def test_the_engine_keeps_three_states_at_the_anchor_and_the_memory_model_agrees():
    transformer = toy()
    plan = second_order_plan(transformer)
    steps = StepExtrapolation(plan)
    # Step 2 anchors the second-order run (a Triple), step 1 keeps the Pair it is built from, step 0 its own H.
    assert steps.history_after == [0, 2, 3, 0, 0, 0]
    assert steps.keep_after == [True, True, True, True, False, False]
    assert steps.second[:3] == [None] * 3 and steps.second[5] is None
    assert steps.second[3] == second_order_weights(0.6, 0.2)
    config = MODEL_CONFIGS["flux-tiny"]
    footprint = measure_footprint(config)
    facts = ModelFacts.for_family("flux", get_family("flux").num_layers(config.build_transformer("meta")))
    flux = dataclasses.replace(plan_from_bits(facts, "00011011"), step_extrapolation=np.zeros(8))
    flux.step_extrapolation[[3, 4, 6]] = (0.5, 0.7, 0.4)
    first = peak_cache_bytes(flux, footprint)
    second = dataclasses.replace(flux, step_extrapolation2=np.array([0, 0, 0, 0.1, 0.2, 0, 0.3, 0]))
    assert peak_cache_bytes(second, footprint) == cache_memory(second, config)["peak_cache_bytes"]
    assert peak_cache_bytes(second, footprint) == first * 3 // 2  # three H at the anchors instead of two


def test_second_order_work_counts_two_lerps():
    transformer = toy()
    plan = second_order_plan(transformer, second=np.array([0.0, 0.0, 0.0, 0.2, 0.0, 0.0]))
    profile = dataclasses.replace(toy_flops(), step_elements=10.0)
    # Step 3: second order (2 lerps), step 4: first order (1 lerp); 3 FLOPs per element and lerp.
    assert extrapolation_work(plan, profile) == {"steps": 2, "units": 0, "second_order_steps": 1, "flops": 90.0}


def test_version_4_round_trips_and_the_format_refuses_what_it_cannot_run(tmp_path):
    transformer = toy()
    plan = second_order_plan(transformer)
    plan.save(tmp_path / "plan.json")
    loaded = CachePlan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.to_dict()["format_version"] == 4
    np.testing.assert_array_equal(loaded.step_extrapolation2, SECOND)
    data = plan.to_dict()
    older = dict(data, format_version=2)
    with pytest.raises(PlanError, match="goes with format_version 4 and only with it"):
        CachePlan.from_dict(older)
    without = {k: v for k, v in data.items() if k != "step_extrapolation2"}
    with pytest.raises(PlanError, match="goes with format_version 4"):
        CachePlan.from_dict(without)
    with pytest.raises(PlanError, match="needs step_extrapolation"):
        second_order_plan(transformer, first=None)
    with pytest.raises(PlanError, match="step_extrapolation2 has a nonzero coefficient at computed step 2"):
        second_order_plan(transformer, second=np.array([0.0, 0.0, 0.1, 0.0, 0.0, 0.0]))
    with pytest.raises(PlanError, match="step_extrapolation2 must hold finite numbers"):
        second_order_plan(transformer, second=np.array([0.0, 0.0, 0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(PlanError, match=r"must have shape \(6,\)"):
        second_order_plan(transformer, second=np.zeros(5))
    # Steps 2 and 3 reuse step 1: only two computed states precede them.
    early = second_order_plan(transformer, np.array([0, 0, 0.3, 0.3, 0, 0]), np.array([0, 0, 0.1, 0, 0, 0]), "001100")
    with pytest.raises(PlanError, match="at second order, but fewer than three computed values precede it"):
        invardiff.enable(transformer, early)
    assert not invardiff.is_enabled(transformer)


def hand_stats():
    """One sample, steps q=0, p=1, a=2, t=3 in R^4."""
    features = np.array([[[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [4.0, 4.0, 0.0, 1.0]]])
    return features, stats_from({STEP_STREAM: features}, window=3)


def test_second_order_fit_equals_the_least_squares_solution():
    features, stats = hand_stats()
    q, p, a, t = features[0]
    basis = np.stack([a - p, a - 2 * p + q], axis=1)
    (c1, c2), *_ = np.linalg.lstsq(basis, t - a, rcond=None)
    residual = float(np.sum((t - a - basis @ (c1, c2)) ** 2))
    got = stats.fit_second_order(STEP_STREAM, 0, 1, 2, 3)
    assert got == pytest.approx((c1, c2, residual), rel=1e-9, abs=1e-12)
    assert got[2] < stats.fit(STEP_STREAM, 1, 2, 3)[1]  # below the first-order residual on this trajectory
    # By hand: d1 = (1, 1, 0, 0), d2 = (0, 1, 0, 0), r = t - a = (2, 3, 0, 1) = 2 d1 + 1 d2 + (0, 0, 0, 1), so
    # c1 = 2, c2 = 1, residual 1; at first order c = <r, d1> / |d1|^2 = 5/2 and the residual 14 - 5/2 * 5 = 1.5.
    assert got == pytest.approx((2.0, 1.0, 1.0), abs=1e-12)
    assert stats.fit(STEP_STREAM, 1, 2, 3) == pytest.approx((2.5, 1.5), abs=1e-12)


def test_second_order_fit_of_parallel_differences_is_the_first_order_fit():
    features = np.array([[[0.0, 0.0], [1.0, 1.0], [3.0, 3.0], [4.0, 5.0]]])  # d2 = 1 * d1
    stats = stats_from({STEP_STREAM: features}, window=3)
    c1, squared = stats.fit(STEP_STREAM, 1, 2, 3)
    assert stats.fit_second_order(STEP_STREAM, 0, 1, 2, 3) == (c1, 0.0, squared)


def test_the_search_rates_its_schedule_at_second_order():
    features = random_trajectories(12, seed=3, samples=3)
    stats = stats_from(features, window=6)
    config = SearchConfig(2.0, extrapolate_steps=True, step_order=2, reuse_units=False)
    result = search_plan(stats, toy_flops(), config)
    plan = result.plan
    computed = np.flatnonzero(~plan.step_cache).tolist()
    h = features[STEP_STREAM]
    error, second_order = 0.0, 0
    for t in np.flatnonzero(plan.step_cache):
        earlier = [s for s in computed if s < t][::-1]
        a, p = earlier[0], earlier[1]
        target = (h[:, t] - h[:, a]).reshape(-1)
        columns = [(h[:, a] - h[:, p]).reshape(-1)]
        if len(earlier) >= 3 and t - earlier[2] <= 6:
            columns.append((h[:, a] - 2 * h[:, p] + h[:, earlier[2]]).reshape(-1))
            second_order += 1
        solution, *_ = np.linalg.lstsq(np.stack(columns, axis=1), target, rcond=None)
        assert plan.step_extrapolation[t] == pytest.approx(solution[0], rel=1e-8, abs=1e-10)
        c2 = solution[1] if len(solution) == 2 else 0.0
        assert plan.step_extrapolation2[t] == pytest.approx(c2, rel=1e-8, abs=1e-10)
        residual = target - np.stack(columns, axis=1) @ solution
        error += math.sqrt(np.mean(residual**2) / np.mean(h[:, t] ** 2))
    assert second_order > 0 and result.plan.to_dict()["format_version"] == 4
    assert result.step_error == pytest.approx(error, rel=1e-9)
    first = search_plan(stats, toy_flops(), dataclasses.replace(config, step_order=1))
    same = schedule_plan(stats, toy_flops(), dataclasses.replace(config, step_order=1), computed)
    assert result.step_error <= same.step_error  # the same schedule at first order errs no less
    assert first.plan.step_extrapolation2 is None and "step_order" not in first.plan.provenance["search"]
    assert _settings_config(plan.provenance["search"]).step_order == 2  # what --refine searches with


def test_the_verified_selection_tries_second_order_first_order_and_plain_reuse():
    config = SearchConfig(3.0, extrapolate_steps=True, step_order=2)
    orders = {setting[-1] for setting in verify_grid(config)}
    assert orders == {(True, False, 2), (True, False, 1), (False, False, 1)}
    assert {setting[-1] for setting in verify_grid(dataclasses.replace(config, step_order=1))} == {
        (True, False, 1),
        (False, False, 1),
    }
    transformer = toy()
    second = second_order_plan(transformer)
    assert not _same_plan(second, dataclasses.replace(second, step_extrapolation2=None))
    assert _same_plan(second, dataclasses.replace(second, step_extrapolation2=SECOND * 2))


def test_second_order_settings_are_checked():
    with pytest.raises(ValueError, match="step_order must be 1 or 2"):
        SearchConfig(2.0, extrapolate_steps=True, step_order=3)
    with pytest.raises(ValueError, match="set extrapolate_steps"):
        SearchConfig(2.0, step_order=2)
    with pytest.raises(NotImplementedError, match="direct fit only"):
        SearchConfig(2.0, extrapolate_steps=True, step_order=2, step_fit="scale_free")
