"""Calibrated extrapolation of reused values: ``v_a + c (v_a - v_p)`` from the last two computed values, and at
second order (reused steps, plan format version 4) ``+ c2 (v_a - 2 v_p + v_q)`` from the last three.

The coefficients come from the plan (format version 2), fitted offline by least squares on calibration
trajectories (``invardiff.calibration.search``), so nothing is decided or measured at run time: a reuse with a
nonzero coefficient costs one fused ``torch.lerp`` on the cached tensors (on their device, in their dtype; the
coefficient is a Python float, so no host sync), and a reuse with a zero coefficient returns the cached tensor
itself, bit-identical to plain reuse. The price is memory: the anchor of such a run keeps two values, not one.
A second-order reuse is two nested lerps (:func:`second_order_weights`) and its anchor keeps three values.
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


class Triple(NamedTuple):
    """The last three computed values of a stream, kept at the anchor of a run that extrapolates at second order."""

    earlier: object
    previous: object
    anchor: object


def anchor_of(value):
    """The last computed value, whether the cache holds it alone, in a :class:`Pair` or in a :class:`Triple`."""
    return value.anchor if isinstance(value, (Pair, Triple)) else value


def history(kept, value, length: int):
    """What a computed step keeps: its ``value`` alone (``length`` 1), or in a :class:`Pair` / :class:`Triple` with
    the last one / two computed values of ``kept`` (which must hold them: the plan's depths say so)."""
    if length <= 1:
        return value
    if length == 2:
        return Pair(anchor_of(kept), value)
    return Triple(kept.previous, kept.anchor, value)


def extrapolate(kept, coefficient: float, second=None):
    """The reused value: ``anchor + c (anchor - previous)`` as one lerp (weight ``1 + c``), or the anchor itself; with
    ``second`` (the nested-lerp weights of :func:`second_order_weights`, for a :class:`Triple`) the second-order value
    as two lerps."""
    if not isinstance(kept, (Pair, Triple)):
        return kept
    if second is not None:
        outer, start, end, inner_weight, outer_weight = second
        values = (kept.earlier, kept.previous, kept.anchor)
        return _lerp(values[outer], _lerp(values[start], values[end], inner_weight), outer_weight)
    if coefficient == 0.0:
        return kept.anchor
    return _lerp(kept.previous, kept.anchor, 1.0 + coefficient)


def second_order_weights(c1: float, c2: float) -> tuple[int, int, int, float, float]:
    """``v = (1 + c1 + c2) v_a - (c1 + 2 c2) v_p + c2 v_q`` as ``lerp(X, lerp(Y, Z, w_in), w_out)`` over a permutation
    of ``(v_q, v_p, v_a)`` (indices 0, 1, 2 of a :class:`Triple`): ``(X, Y, Z, w_in, w_out)``.

    Two lerps, so that the FLOP counter counts a second-order reuse as two first-order ones (``flops.LERP_FLOPS`` per
    element and lerp). ``w_out`` is 1 minus the weight of ``X``; the three choices of ``X`` give ``1 - c2``,
    ``1 + c1 + 2 c2`` and ``-(c1 + c2)``, which sum to 2 (the weights sum to 1), so the largest is at least 2/3 in
    size: that one is taken, and ``w_in = weight of Z / w_out`` stays finite for any coefficients."""
    weights = (c2, -(c1 + 2.0 * c2), 1.0 + c1 + c2)  # of v_q, v_p, v_a
    orders = ((0, 1, 2), (1, 0, 2), (2, 0, 1))  # (X, Y, Z)
    outer, start, end = max(orders, key=lambda order: abs(1.0 - weights[order[0]]))
    outer_weight = 1.0 - weights[outer]
    return outer, start, end, weights[end] / outer_weight, outer_weight


def _lerp(previous, anchor, weight: float):
    if torch.is_tensor(anchor):
        return torch.lerp(previous, anchor, weight)
    return type(anchor)(_lerp(p, a, weight) for p, a in zip(previous, anchor, strict=True))  # tuple outputs


def history_after(reuse: np.ndarray, executed: np.ndarray, orders: np.ndarray, where: str = "unit") -> np.ndarray:
    """``(T,)`` int: how many computed values a stream keeps after computing step t, where a later reuse extrapolates
    from them: 2 (a :class:`Pair`, order 1) or 3 (a :class:`Triple`, order 2) at the anchor of such a run, 2 at the
    computed step before a Triple's anchor (the Triple is built from that Pair); 0 elsewhere (the value alone, kept
    while the next executed step reuses it). ``reuse[t]``: the stream is reused at step t; ``executed[t]``: it can
    compute at t; ``orders[t]``: the extrapolation order of a reuse at t (0, 1 or 2)."""
    computed = np.flatnonzero(executed & ~reuse)
    length = np.zeros(len(reuse), dtype=int)
    for t in np.flatnonzero(reuse & (orders > 0)):
        earlier, need = computed[computed < t], int(orders[t]) + 1
        if len(earlier) < need:
            order, count = (" at second order", "three") if need == 3 else ("", "two")
            raise PlanError(
                f"The plan extrapolates the {where} at step {t}{order}, but fewer than {count} computed values "
                f"precede it ({len(earlier)}). Set that coefficient to 0."
            )
        length[earlier[-1]] = max(length[earlier[-1]], need)
    # A Triple is built from the Pair kept at the computed step before its anchor (an anchor has two before it).
    for index in np.flatnonzero(length[computed] == 3):
        length[computed[index - 1]] = max(length[computed[index - 1]], 2)
    return length


class StepExtrapolation:
    """Per-step lists for the step stream (H): first-order coefficient, second-order lerp weights (or None), how many
    computed H to keep after t (:func:`history_after`), and whether to keep H (or its history) after t at all."""

    def __init__(self, plan):
        T = plan.num_inference_steps
        cached = plan.step_cache
        first = plan.step_extrapolation if plan.step_extrapolation is not None else np.zeros(T)
        second = plan.step_extrapolation2 if plan.step_extrapolation2 is not None else np.zeros(T)
        length = history_after(cached, ~cached, plan.step_extrapolation_order(), "step")
        # After t the cache must survive when step t + 1 reuses it, or computes the anchor of a pair or triple.
        keep = np.append(cached[1:] | (length[1:] >= 2), False)
        self.coefficient = [float(c) for c in first]
        self.second = [
            second_order_weights(float(a), float(b)) if b != 0 else None for a, b in zip(first, second, strict=True)
        ]
        self.history_after, self.keep_after = length.tolist(), keep.tolist()


def unit_coefficients(plan, units) -> np.ndarray:
    """``(T, U)`` coefficients in engine unit order (zeros without unit extrapolation)."""
    result = np.zeros((plan.num_inference_steps, len(units)))
    if plan.unit_extrapolation is not None:
        for index, unit in enumerate(units):
            result[:, index] = plan.unit_extrapolation[unit.block_list][unit.name][:, unit.layer]
    return result
