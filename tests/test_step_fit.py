"""The scale-free fit of reused steps (``SearchConfig(step_fit="scale_free")``) on hand-made trajectories: the
coefficient and residual written out by hand, and the search's coefficients equal to the least-squares solution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_search import random_trajectories, stats_from, toy_flops

from invardiff.calibration.budget import _settings_config
from invardiff.calibration.search import SearchConfig, search_plan
from invardiff.calibration.trajectory import STEP_STREAM

import toy_family  # noqa: F401  (registers the "toy" family)


def hand_stats(target):
    """One sample, steps p=0, a=1, t=2: f_p = (1, 0, 0), f_a = (1, 1, 0), f_t = ``target``."""
    features = np.array([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], target]])
    return stats_from({STEP_STREAM: features}, window=2)


def test_scale_free_fit_by_hand():
    # f_t = (2, 3, 1) = 3 f_a - f_p + (0, 0, 1): alpha = 3, beta = -1, so g = 2 and c = 1/2; the residual is the
    # part outside the plane of f_a and f_p, (0, 0, 1), squared: 1.
    stats = hand_stats([2.0, 3.0, 1.0])
    coefficient, squared = stats.fit_scale_free(STEP_STREAM, 0, 1, 2)
    assert coefficient == pytest.approx(0.5, abs=1e-12)
    assert squared == pytest.approx(1.0, abs=1e-12)
    # The direct fit spends its coefficient on the scale too: c = <f_t - f_a, f_a - f_p> / |f_a - f_p|^2 = 2.
    assert stats.fit(STEP_STREAM, 0, 1, 2)[0] == pytest.approx(2.0, abs=1e-12)
    # Plain reuse up to scale: |f_t|^2 - <f_t, f_a>^2 / |f_a|^2 = 14 - 25 / 2.
    assert stats.scale_free_error(STEP_STREAM, 1, 2) == pytest.approx(1.5, abs=1e-12)


def test_scale_free_fit_without_a_direction_or_with_a_negative_scale_reuses_plainly():
    parallel = stats_from({STEP_STREAM: np.array([[[1.0, 1.0], [2.0, 2.0], [3.0, 1.0]]])}, window=2)
    coefficient, squared = parallel.fit_scale_free(STEP_STREAM, 0, 1, 2)
    assert coefficient == 0.0
    assert squared == pytest.approx(10.0 - 64.0 / 8.0, abs=1e-12)  # |f_t|^2 - <f_t, f_a>^2 / |f_a|^2
    # f_t = -(f_a + (f_a - f_p)) = (-1, -2, 0): alpha = -2, beta = 1, g = -1 <= 0; plain reuse then errs |f_t|^2 (the
    # best scale of f_a is 0, as <f_t, f_a> < 0).
    coefficient, squared = hand_stats([-1.0, -2.0, 0.0]).fit_scale_free(STEP_STREAM, 0, 1, 2)
    assert coefficient == 0.0
    assert squared == pytest.approx(5.0, abs=1e-12)


def test_search_coefficients_and_error_equal_the_scale_free_least_squares_solution():
    T = 10
    features = random_trajectories(T, seed=5, samples=3)
    stats = stats_from(features, window=4)
    config = SearchConfig(2.0, extrapolate_steps=True, step_fit="scale_free", reuse_units=False)
    result = search_plan(stats, toy_flops(), config)
    plan = result.plan
    computed = np.flatnonzero(~plan.step_cache).tolist()
    h = features[STEP_STREAM]
    error = 0.0
    for t in np.flatnonzero(plan.step_cache):
        earlier = [s for s in computed if s < t]
        a, p = earlier[-1], earlier[-2]
        target = h[:, t].reshape(-1)
        if t - p > 4:  # outside the recorded window: plain reuse, its error up to the best scale of H_a
            assert plan.step_extrapolation[t] == 0.0
            direction = h[:, a].reshape(-1)
        else:
            basis = np.stack([h[:, a].reshape(-1), h[:, p].reshape(-1)], axis=1)  # pooled over the three samples
            alpha, beta = np.linalg.lstsq(basis, target, rcond=None)[0]
            assert plan.step_extrapolation[t] == pytest.approx(-beta / (alpha + beta), rel=1e-9, abs=1e-12)
            direction = h[:, a].reshape(-1) + plan.step_extrapolation[t] * (h[:, a] - h[:, p]).reshape(-1)
        scale = max(target @ direction, 0.0) / (direction @ direction)
        error += math.sqrt(np.mean((target - scale * direction) ** 2) / np.mean(h[:, t] ** 2))
    assert (plan.step_extrapolation != 0).any()
    assert result.step_error == pytest.approx(error, rel=1e-9)
    assert plan.provenance["search"]["step_fit"] == "scale_free"
    assert _settings_config(plan.provenance["search"]).step_fit == "scale_free"  # what --refine searches with


def test_direct_fit_plans_are_unchanged_and_a_bad_fit_is_refused():
    stats = stats_from(random_trajectories(8, seed=1), window=3)
    plan = search_plan(stats, toy_flops(), SearchConfig(2.0, extrapolate_steps=True)).plan
    assert "step_fit" not in plan.provenance["search"]  # plans of the direct fit are written as before
    assert _settings_config(plan.provenance["search"]).step_fit == "direct"
    with pytest.raises(ValueError, match="step_fit must be one of"):
        SearchConfig(2.0, step_fit="magnitude")
