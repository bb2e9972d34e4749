"""benchmarks/frontier_schedules.py's second-order fit from the Gram matrices, on hand-made trajectories: exact on a
quadratic trajectory, and the coefficients of the least-squares solution on the features themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_search import random_trajectories, stats_from


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frontier_schedules as script  # noqa: E402


def test_second_order_fit_is_exact_on_a_quadratic_trajectory():
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(2, 1, 5)) for _ in range(3))
    t = np.arange(13).reshape(1, -1, 1)
    stats = stats_from({"step": a + b * t + c * t**2}, window=12)
    error, coefficients = script.residual(stats, 12, [9, 6, 3])
    # f_12 = 3 f_9 - 3 f_6 + f_3 = f_9 + 2 (f_9 - f_6) - (f_6 - f_3) on a quadratic
    assert coefficients == pytest.approx([2.0, -1.0], abs=1e-6) and error == pytest.approx(0.0, abs=1e-6)
    assert script.residual(stats, 12, [9, 6])[0] > 1.0  # first order leaves the curvature


def test_fit_coefficients_are_the_least_squares_solution_on_the_features():
    features = random_trajectories(12, seed=5)
    stats = stats_from(features, window=11)
    f = features["step"]
    t, basis = 11, [8, 5, 1]
    design = np.stack([(f[:, basis[k]] - f[:, basis[k + 1]]).ravel() for k in range(2)], axis=1)
    goal = (f[:, t] - f[:, basis[0]]).ravel()
    solution, *_ = np.linalg.lstsq(design, goal, rcond=None)
    error, coefficients = script.residual(stats, t, basis)
    assert coefficients == pytest.approx(solution, rel=1e-9)
    assert error == pytest.approx(float(np.sum((goal - design @ solution) ** 2)), rel=1e-9)
    plain = float(np.sum(goal**2))
    assert script.residual(stats, t, basis[:1])[0] == pytest.approx(plain, rel=1e-12)
    totals = script.order_errors(stats, [0, 1, 5, 8, 11])
    assert totals[0] >= totals[1] >= totals[2] > 0  # more terms never fit worse
