"""The extrapolation coefficients of a plan (format versions 2 and 4): checks and JSON fields.

A coefficient ``c`` at a reused step (or a reused unit at an executed step) says that the reused value is
``v_a + c (v_a - v_p)`` instead of ``v_a``, where ``v_a`` and ``v_p`` are the last two computed values. Coefficients
are only meaningful where something is reused, so a nonzero coefficient anywhere else is an error.

Second order (format version 4, reused steps only): a coefficient ``c2`` in ``step_extrapolation2`` adds
``c2 (v_a - 2 v_p + v_q)``, the second difference of the last three computed values (``v_q`` the one before ``v_p``),
so the reused step is ``v_a + c (v_a - v_p) + c2 (v_a - 2 v_p + v_q)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .families import get_family
from .plan_file import PlanError


# The largest coefficient a plan may hold, in absolute value. On a straight trajectory the fitted coefficient is the
# ratio of the gap it extrapolates over to the gap it was measured on, c = (t - a) / (a - p), so at most T - 2 < 1000
# for the at most 1000 steps of a plan (plan_transforms.MAX_RESAMPLE_STEPS); the least-squares fit
# (calibration/trajectory.py) clips to this range. Beyond it the reused value is dominated by the difference of two
# nearly equal tensors, rounding included, and a coefficient of 1e300 overflowed torch.lerp's weight mid-run.
MAX_COEFFICIENT = 1000.0
SECOND_ORDER_VERSION = 4  # the plan format version of plans with second-order step coefficients


def validate_extrapolation(plan) -> None:
    """Shapes, finiteness, and coefficients only where the plan reuses; raises :class:`PlanError`."""
    T = plan.num_inference_steps
    steps = plan.step_extrapolation
    if steps is not None:
        if steps.shape != (T,):
            raise PlanError(
                f"step_extrapolation must have shape ({T},) (one coefficient per step), got {steps.shape}."
            )
        _check_finite(steps, "step_extrapolation")
        _check_on_cached_steps(plan, steps, "step_extrapolation")
    second = plan.step_extrapolation2
    if second is not None:
        if steps is None:
            raise PlanError(
                "step_extrapolation2 (second-order coefficients) needs step_extrapolation (the first-order ones, "
                "zeros allowed) beside it."
            )
        if second.shape != (T,):
            raise PlanError(
                f"step_extrapolation2 must have shape ({T},) (one coefficient per step), got {second.shape}."
            )
        _check_finite(second, "step_extrapolation2")
        _check_on_cached_steps(plan, second, "step_extrapolation2")
    if plan.unit_extrapolation is None:
        return
    family = get_family(plan.model.family)
    expected = {facts.name: facts.num_layers for facts in plan.model.block_lists}
    if sorted(plan.unit_extrapolation) != sorted(expected):
        raise PlanError(
            f"unit_extrapolation must have the block lists {sorted(expected)}, got {sorted(plan.unit_extrapolation)}."
        )
    executed = ~plan.step_cache
    for name, units in plan.unit_extrapolation.items():
        spec = family.block_list(name)
        names = [unit.name for unit in spec.units]
        if sorted(units) != sorted(names):
            raise PlanError(f"unit_extrapolation.{name} must have the units {names}, got {sorted(units)}.")
        reuse = spec.unit_reuse(plan.module_reuse[name])
        for unit, matrix in units.items():
            where = f"unit_extrapolation.{name}.{unit}"
            if matrix.shape != (T, expected[name]):
                raise PlanError(
                    f"{where} must have shape ({T}, {expected[name]}) (steps x layers), got {matrix.shape}."
                )
            _check_finite(matrix, where)
            misplaced = np.argwhere((matrix != 0) & ~(reuse[unit] & executed[:, None]))
            if misplaced.size:
                step, layer = misplaced[0]
                raise PlanError(
                    f"{where} has a nonzero coefficient at step {step}, layer {layer}, where the unit is not reused "
                    f"on an executed step. Set it to 0."
                )


def _check_on_cached_steps(plan, coefficients: np.ndarray, where: str) -> None:
    misplaced = np.flatnonzero((coefficients != 0) & ~plan.step_cache)
    if misplaced.size:
        raise PlanError(
            f"{where} has a nonzero coefficient at computed step {misplaced[0]}; coefficients apply only to "
            f"step-cached steps. Set it to 0."
        )


def _check_finite(values: np.ndarray, where: str) -> None:
    """Finite coefficients within [-MAX_COEFFICIENT, MAX_COEFFICIENT]."""
    if not np.isfinite(values).all():
        raise PlanError(f"{where} must hold finite numbers, got {values[~np.isfinite(values)][0]!r}.")
    outside = np.abs(values) > MAX_COEFFICIENT
    if outside.any():
        raise PlanError(
            f"{where} must hold coefficients from {-MAX_COEFFICIENT:g} to {MAX_COEFFICIENT:g} (a fitted coefficient "
            f"is a ratio of step gaps), got {values[outside][0]!r}; recalibrate, or set it to 0 to reuse plainly."
        )


def extrapolation_to_dict(plan) -> dict[str, Any]:
    fields = {}
    if plan.step_extrapolation is not None:
        fields["step_extrapolation"] = [float(c) for c in plan.step_extrapolation]
    if plan.step_extrapolation2 is not None:
        fields["step_extrapolation2"] = [float(c) for c in plan.step_extrapolation2]
    if plan.unit_extrapolation is not None:
        fields["unit_extrapolation"] = {
            name: {unit: matrix.tolist() for unit, matrix in units.items()}
            for name, units in plan.unit_extrapolation.items()
        }
    return fields


def extrapolation_from_dict(data: dict, version: int, model, T: int):
    """``(step_extrapolation, unit_extrapolation, step_extrapolation2)`` of a plan dict; version 1 has none, only
    version 4 has the second-order coefficients (and must: an older invardiff refuses version 4 rather than run the
    plan without them)."""
    present = [key for key in ("step_extrapolation", "unit_extrapolation") if key in data]
    if version == 1:
        if present:
            raise PlanError(f"plan.{present[0]} needs format_version 2, but the file says version 1.")
        return None, None, None
    second = data.get("step_extrapolation2")
    if (second is not None) != (version == SECOND_ORDER_VERSION):
        raise PlanError(
            f"plan.step_extrapolation2 (second-order coefficients) goes with format_version {SECOND_ORDER_VERSION} "
            f"and only with it; the file says version {version} and "
            f"{'has' if second is not None else 'has no'} step_extrapolation2."
        )
    if second is not None:
        second = _numbers(second, (T,), "plan.step_extrapolation2")
    steps = data.get("step_extrapolation")
    if steps is not None:
        steps = _numbers(steps, (T,), "plan.step_extrapolation")
    units = data.get("unit_extrapolation")
    if units is not None:
        if not isinstance(units, dict) or not all(isinstance(u, dict) for u in units.values()):
            raise PlanError("plan.unit_extrapolation must be {block_list: {unit: [[coefficient per layer], ...]}}.")
        layers = {facts.name: facts.num_layers for facts in model.block_lists}
        units = {
            name: {
                unit: _numbers(rows, (T, layers.get(name, 0)), f"plan.unit_extrapolation.{name}.{unit}")
                for unit, rows in per_unit.items()
            }
            for name, per_unit in units.items()
        }
    return steps, units, second


def _numbers(value, shape: tuple, where: str) -> np.ndarray:
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlanError(f"{where} must hold numbers, got {str(value):.60}.") from None
    if array.shape != shape or any(isinstance(v, bool) for v in np.ravel(np.array(value, dtype=object))):
        raise PlanError(f"{where} must be numbers of shape {shape}, got shape {array.shape}.")
    return array
