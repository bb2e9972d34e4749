"""benchmarks/frontier_probe_signal.py's arithmetic, on hand-made values."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frontier_probe_signal as script  # noqa: E402


def test_per_step_stacks_runs_made_one_image_after_the_other():
    # Image i, step t recorded as the value 10 i + t, one call per image and step: 2 images of 3 steps.
    calls = [torch.full((1, 2), float(10 * i + t)) for i in range(2) for t in range(3)]
    stacked = script.per_step(calls, 3)
    assert stacked.shape == (3, 2, 2)
    assert stacked[:, :, 0].tolist() == [[0.0, 10.0], [1.0, 11.0], [2.0, 12.0]]
    with pytest.raises(ValueError, match="5 recorded calls"):
        script.per_step(calls[:5], 3)


def test_relative_error_is_squared_and_per_image():
    truth = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # norms 5 and 1
    estimate = torch.tensor([[3.0, 5.0], [0.0, 0.0]])  # errors 1 and 1
    np.testing.assert_allclose(script.relative_error(estimate, truth), [1 / 25, 1.0])


def test_carried_coefficient_continues_a_straight_line():
    # H_s = s v: anchors 4 and 2, reused step 6 fitted at c = (6 - 4) / (4 - 2) = 1; step 7 lies at 3 / 2.
    assert script.carried_coefficient(1.0, 4, 6) == 1.5
    assert script.carried_coefficient(0.0, 4, 6) == 0.0
