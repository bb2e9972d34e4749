"""Second-order extrapolation of reused steps (plan format version 4): ``H_a + c1 (H_a - H_p) + c2 (H_a - 2 H_p +
H_q)`` at run time (two nested lerps, counted as two), the least-squares fit on hand-made trajectories, the refit of
a searched plan (within its FLOP budget, kept where it samples closer), the history of H the engine keeps, and the
file format's refusals."""

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
from invardiff.calibration.budget import _second_order_kept, calibrate_budget, sampled_mse
from invardiff.calibration.search import SearchConfig, search_plan
from invardiff.calibration.second_order import second_order_refit
from invardiff.calibration.trajectory import STEP_STREAM
from invardiff.families import get_family
from invardiff.flops import flop_counter
from invardiff.memory import cache_memory
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.plan import CachePlan, ModelFacts, PlanError
from invardiff.policies.extrapolation import StepExtrapolation, Triple, extrapolate, second_order_weights
from invardiff.stats import extrapolation_work, ideal_speedup, plan_flops

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


def _first_order_search(window=6):
    features = random_trajectories(16, seed=3, samples=3)  # computes steps 0, 1, 3, 5, 9, 13, 15 at 2x
    stats = stats_from(features, window=window)
    result = search_plan(stats, toy_flops(), SearchConfig(2.0, extrapolate_steps=True, reuse_units=False))
    return features, stats, result


def _least_squares(h, computed, t, window):
    """(c1, c2, squared residual, first-order squared residual) of reused step t from the features themselves, or
    None when the window does not hold its three last computed steps."""
    earlier = [s for s in computed if s < t][::-1]
    if len(earlier) < 3 or t - earlier[2] > window:
        return None
    a, p, q = earlier[:3]
    target = (h[:, t] - h[:, a]).reshape(-1)
    d1, d2 = (h[:, a] - h[:, p]).reshape(-1), (h[:, a] - 2 * h[:, p] + h[:, q]).reshape(-1)
    (c1, c2), *_ = np.linalg.lstsq(np.stack([d1, d2], axis=1), target, rcond=None)
    first = target @ d1 / (d1 @ d1)
    return c1, c2, float(np.sum((target - c1 * d1 - c2 * d2) ** 2)), float(np.sum((target - first * d1) ** 2))


def test_the_refit_fits_every_reused_step_the_window_reaches_by_least_squares():
    features, stats, first = _first_order_search()
    result = second_order_refit(stats, toy_flops(), first, 2.0)  # the toy profile counts no lerp FLOPs
    plan, h = result.plan, features[STEP_STREAM]
    computed = np.flatnonzero(~plan.step_cache).tolist()
    np.testing.assert_array_equal(plan.step_cache, first.plan.step_cache)
    change, refitted = 0.0, 0
    for t in np.flatnonzero(plan.step_cache):
        fit = _least_squares(h, computed, t, 6)
        if fit is None:
            assert plan.step_extrapolation2[t] == 0 and plan.step_extrapolation[t] == first.plan.step_extrapolation[t]
            continue
        c1, c2, squared, before = fit
        assert (plan.step_extrapolation[t], plan.step_extrapolation2[t]) == pytest.approx((c1, c2), rel=1e-8)
        scale = np.sum(h[:, t] ** 2)  # relative errors: RMS over H's RMS, pooled over the samples
        change += math.sqrt(squared / scale) - math.sqrt(before / scale)
        refitted += 1
    assert refitted > 0 and plan.provenance["search"]["second_order"] == {"steps": refitted, "window": 6}
    assert result.step_error == pytest.approx(first.step_error + change, rel=1e-9)
    assert result.step_error < first.step_error
    assert "second_order" not in first.plan.provenance["search"]  # the first-order plan is not touched


def test_the_refit_spends_only_the_budget_left_on_the_steps_of_largest_gain():
    features, stats, first = _first_order_search()
    profile = dataclasses.replace(toy_flops(), step_elements=10.0)  # a lerp: 30 FLOPs
    # Room for exactly one more lerp than the first-order plan runs: one step gets second order, the one whose
    # squared error drops most (every reused step already extrapolates at first order, so each adds one lerp).
    speedup = 16 * profile.full_step / (plan_flops(first.plan, profile) + 1.5 * 30)
    plan = second_order_refit(stats, profile, first, speedup).plan
    h, computed = features[STEP_STREAM], np.flatnonzero(~first.plan.step_cache).tolist()
    gains = {}
    for t in np.flatnonzero(first.plan.step_cache):
        fit = _least_squares(h, computed, t, 6)
        if fit is not None:
            gains[int(t)] = fit[3] - fit[2]
    assert len(gains) > 1 and (first.plan.step_extrapolation[list(gains)] != 0).all()
    assert np.flatnonzero(plan.step_extrapolation2).tolist() == [max(gains, key=gains.get)]
    assert ideal_speedup(plan, profile) >= speedup
    no_room = 16 * profile.full_step / (plan_flops(first.plan, profile) + 0.5 * 30)
    assert second_order_refit(stats, profile, first, no_room) is None


def test_search_plan_at_second_order_is_the_first_order_search_refitted():
    _, stats, first = _first_order_search()
    config = SearchConfig(2.0, extrapolate_steps=True, reuse_units=False, step_order=2)
    assert search_plan(stats, toy_flops(), config).plan == second_order_refit(stats, toy_flops(), first, 2.0).plan


def test_the_verified_selection_keeps_the_refit_only_where_it_samples_closer():
    _, stats, first = _first_order_search()
    for refit_mse, kept in ((0.5, True), (2.0, False)):
        chosen = dataclasses.replace(first, plan=dataclasses.replace(first.plan))
        chosen.plan.provenance = {**first.plan.provenance, "search": dict(first.plan.provenance["search"])}

        def measure(plan, refit_mse=refit_mse):
            return refit_mse if plan.step_extrapolation2 is not None else 1.0

        result = _second_order_kept(stats, toy_flops(), chosen, measure)
        assert (result.plan.step_extrapolation2 is not None) == kept
        record = result.plan.provenance["search"]["second_order"]
        assert (record["kept"], record["output_mse"], record["first_order_mse"]) == (kept, refit_mse, 1.0)


def test_a_short_window_for_the_search_sees_the_same_statistics_as_a_short_recording():
    features = random_trajectories(10, seed=2)
    long, short = stats_from(features, window=7), stats_from(features, window=3)
    within = long.within(3)
    assert within.window == 3 and within.gram.keys() == short.gram.keys()
    for name in short.gram:
        np.testing.assert_array_equal(within.gram[name], short.gram[name])
    assert long.window == 7  # the recording itself is kept whole
    with pytest.raises(ValueError, match="from 1 to the recorded 7"):
        long.within(8)


def test_second_order_settings_are_checked():
    with pytest.raises(ValueError, match="step_order must be 1 or 2"):
        SearchConfig(2.0, extrapolate_steps=True, step_order=3)
    with pytest.raises(ValueError, match="set extrapolate_steps"):
        SearchConfig(2.0, step_order=2)
    with pytest.raises(NotImplementedError, match="direct fit only"):
        SearchConfig(2.0, extrapolate_steps=True, step_order=2, step_fit="scale_free")
    with pytest.raises(NotImplementedError, match="a memory bound"):
        SearchConfig(2.0, extrapolate_steps=True, step_order=2, memory=object())
    with pytest.raises(ValueError, match=r"fit_window \(4\) is how far back the refit reads: at least window \(6\)"):
        calibrate_budget(None, num_inference_steps=10, cases=[], speedups=[2.0], window=6, fit_window=4)


def test_the_sampled_error_of_a_plan_is_its_last_stage_s():
    """What calibrate prints and the refit is compared with: the verified error, else the descent's last, else the
    kept refit's; None for a plan nothing sampled."""
    _, _, first = _first_order_search()
    plan = first.plan
    assert sampled_mse(plan) is None
    plan.provenance["search"]["verified"] = {"output_mse": 3.0}
    assert sampled_mse(plan) == 3.0
    plan.provenance["search"]["refined"] = {"moves": [[[0, 1], 3.0], [[0, 2], 2.0]]}
    assert sampled_mse(plan) == 2.0
    plan.provenance["search"]["second_order"] = {"kept": False, "output_mse": 2.5}
    assert sampled_mse(plan) == 2.0
    plan.provenance["search"]["second_order"] = {"kept": True, "output_mse": 1.5}
    assert sampled_mse(plan) == 1.5
