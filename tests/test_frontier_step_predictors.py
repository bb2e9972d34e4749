"""benchmarks/frontier_step_predictors.py's per-step fits on hand-made trajectories: the coefficients written out by
hand, and the reused value they give."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frontier_step_predictors as script  # noqa: E402


def trajectories():
    """Steps p=0, a=1, t=2 of one sample with two tokens of two features: H and x per step."""
    H = {0: torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), 1: torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])}
    x = {
        0: torch.zeros(1, 2, 2),
        1: torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]),
        2: torch.tensor([[[0.0, 0.0], [0.0, 2.0]]]),
    }
    H[2] = torch.tensor([[[2.0, 3.0], [0.0, 2.0]]])
    return H, x


def test_state_fits_by_hand():
    H, x = trajectories()
    computed = [0, 1]
    assert script.fit("state", H, x, computed, 2) == []
    # state-2: H_2 = alpha H_1 + beta H_0 + (0, 0, 0, 2); on the plane of H_1, H_0: (2, 3) = 3 (1, 1) - (1, 0).
    assert script.fit("state-2", H, x, computed, 2) == pytest.approx([3.0, -1.0])
    # state-extrap: c = <H_2 - H_1, H_1 - H_0> / |H_1 - H_0|^2 = <(1, 2, 0, 2), (0, 1, 0, 0)> / 1 = 2.
    assert script.fit("state-extrap", H, x, computed, 2) == pytest.approx([2.0])
    # state-gain: g = <H_2, H_1> / |H_1|^2 = 5 / 2.
    assert script.fit("state-gain", H, x, computed, 2) == pytest.approx([2.5])


def test_residual_fits_and_reused_value_by_hand():
    H, x = trajectories()
    computed = [0, 1]
    # R_1 = H_1 - x_1 = (1, 1, -1, 0); target R_2 = H_2 - x_2 = (2, 3, 0, 0); g = <R_2, R_1> / |R_1|^2 = 5 / 3.
    (gain,) = script.fit("residual-gain", H, x, computed, 2)
    assert gain == pytest.approx(5.0 / 3.0)
    fixed, free = script.terms("residual-gain", H, x, 1, 0, x[2])
    reused = sum(fixed) + gain * free[0]  # x_2 + g R_1
    expected = torch.tensor([[[5.0 / 3.0, 5.0 / 3.0], [-5.0 / 3.0, 2.0]]])
    assert torch.allclose(reused, expected)
    # residual (plain): x_2 + R_1, no coefficient.
    fixed, free = script.terms("residual", H, x, 1, 0, x[2])
    assert free == [] and torch.equal(sum(fixed), torch.tensor([[[1.0, 1.0], [-1.0, 2.0]]]))


def test_state_channel_fits_each_channel_alone():
    # H_1 - H_0 = ((1, 1), (1, 0)), H_2 - H_1 = ((2, 3), (2, 2)) over (token, channel): channel 0 sums <(2, 2), (1, 1)>
    # / 2 = 2, channel 1 <(3, 2), (1, 0)> / 1 = 3.
    H = {
        0: torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]),
        1: torch.tensor([[[2.0, 1.0], [1.0, 0.0]]]),
        2: torch.tensor([[[4.0, 4.0], [3.0, 2.0]]]),
    }
    x = {t: torch.zeros(1, 2, 2) for t in H}
    (coefficients,) = script.fit("state-channel", H, x, [0, 1], 2)
    assert coefficients.tolist() == [2.0, 3.0]
    # A channel whose last two computed values are equal cannot be fitted: it is reused plainly (coefficient 0).
    H, x = trajectories()  # channel 0: H_1 - H_0 = (0, 0); channel 1: (1, 0) against a target of (2, 2)
    (coefficients,) = script.fit("state-channel", H, x, [0, 1], 2)
    assert coefficients.tolist() == [0.0, 2.0]
