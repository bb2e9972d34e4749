"""Calibrated extrapolation of reused values: ``v_a + c (v_a - v_p)`` from the last two computed values.

The coefficients come from the plan (format version 2), fitted offline by least squares on calibration
trajectories (``invardiff.calibration.search``), so nothing is decided or measured at run time: a reuse with a
nonzero coefficient costs one fused ``torch.lerp`` on the cached tensors (on their device, in their dtype; the
coefficient is a Python float, so no host sync), and a reuse with a zero coefficient returns the cached tensor
itself, bit-identical to plain reuse. The price is memory: the anchor of such a run keeps two values, not one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..plan import PlanError


class Pair(NamedTuple):
    """The last two computed values of a stream, kept at the anchor of a run that extrapolates."""

    previous: object
    anchor: object


def anchor_of(value):
    """The last computed value, whether the cache holds it alone or in a :class:`Pair`."""
    return value.anchor if isinstance(value, Pair) else value


def extrapolate(kept, coefficient: float):
    """The reused value: ``anchor + c (anchor - previous)`` as one lerp (weight ``1 + c``), or the anchor itself."""
    if not isinstance(kept, Pair):
        return kept
    if coefficient == 0.0:
        return kept.anchor
    return _lerp(kept.previous, kept.anchor, 1.0 + coefficient)


def _lerp(previous, anchor, weight: float):
    if torch.is_tensor(anchor):
        return torch.lerp(previous, anchor, weight)
    return type(anchor)(_lerp(p, a, weight) for p, a in zip(previous, anchor, strict=True))  # tuple outputs


def pair_after(reuse: np.ndarray, executed: np.ndarray, coefficients: np.ndarray, where: str = "unit") -> np.ndarray:
    """Steps after whose computation a stream keeps a :class:`Pair`: the anchors of runs with a nonzero
    coefficient. ``reuse[t]``: the stream is reused at step t; ``executed[t]``: the stream can compute at t."""
    computed = executed & ~reuse
    pair = np.zeros_like(reuse)
    for t in np.flatnonzero(reuse & (coefficients != 0)):
        earlier = np.flatnonzero(computed[:t])
        if len(earlier) < 2:
            raise PlanError(
                f"The plan extrapolates the {where} at step {t}, but fewer than two computed values precede it. "
                f"Set that coefficient to 0."
            )
        pair[earlier[-1]] = True
    return pair


class StepExtrapolation:
    """Per-step lists for the step stream (H): coefficient, keep a pair after t, keep H (or the pair) after t."""

    def __init__(self, plan):
        T = plan.num_inference_steps
        cached = plan.step_cache
        coefficients = plan.step_extrapolation if plan.step_extrapolation is not None else np.zeros(T)
        pair = pair_after(cached, ~cached, coefficients, "step")
        # After t the cache must survive when step t + 1 reuses it, or computes the anchor of a pair.
        keep = np.append(cached[1:] | pair[1:], False)
        self.coefficient = [float(c) for c in coefficients]
        self.pair_after, self.keep_after = pair.tolist(), keep.tolist()


def unit_coefficients(plan, units) -> np.ndarray:
    """``(T, U)`` coefficients in engine unit order (zeros without unit extrapolation)."""
    result = np.zeros((plan.num_inference_steps, len(units)))
    if plan.unit_extrapolation is not None:
        for index, unit in enumerate(units):
            result[:, index] = plan.unit_extrapolation[unit.block_list][unit.name][:, unit.layer]
    return result
