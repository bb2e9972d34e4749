"""Build an InvarDiff plan from run-averaged change rates, exactly as the official code (SPEC.md A.3).

Index convention: ``rates[j]`` is the rate stored when call ``j + 1`` finishes, i.e. ``|f[j+1] - f[j]| /
|f[j] - f[j-1]|``; entries 0 and T-1 are placeholders and never used. Thresholds are quantiles of the interior
``[1, T-1)`` (flattened over layers for module kinds, NaN ignored), comparisons are strict ``<``.
"""

from __future__ import annotations

import math

import numpy as np

from ..families.calibration_spec import FamilyCalibration, InvarDiffThresholds


def warmup_steps(nonskip_rate: float, num_steps: int) -> int:
    """n_ns = max(1, floor(nonskip_rate * T)): the steps that always compute."""
    return max(1, math.floor(nonskip_rate * num_steps))


def quantile_threshold(rates: np.ndarray, level: float) -> float:
    """Quantile (linear interpolation, as torch.quantile) of the interior rows [1, T-1), NaN ignored."""
    interior = np.asarray(rates, dtype=np.float64)[1:-1].ravel()
    if np.isnan(interior).all():
        return -math.inf  # nothing measurable: reuse nothing
    return float(np.nanquantile(interior, level, method="linear"))


def gate(rates: np.ndarray, level: float) -> np.ndarray:
    """Reuse where the rate is strictly below the quantile threshold (NaN never reuses)."""
    threshold = quantile_threshold(rates, level)
    with np.errstate(invalid="ignore"):
        return np.asarray(rates) < threshold


def force_compute(bits: np.ndarray, first: int) -> np.ndarray:
    """Force rows [0, first) and the last row to compute."""
    bits = bits.copy()
    bits[:first] = False
    bits[-1] = False
    return bits


def interplay(step_cache: np.ndarray, modules: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Step-to-module interplay (SPEC.md A.3 step 6), scanning forward: a step-cached row is all-reuse
    (cosmetic: it never executes) and the row after it computes everything."""
    modules = {kind: bits.copy() for kind, bits in modules.items()}
    for t in np.flatnonzero(step_cache):
        for bits in modules.values():
            bits[t] = True
            if t + 1 < len(step_cache):
                bits[t + 1] = False
    return modules


def module_level(thresholds: InvarDiffThresholds, family: FamilyCalibration, kind: str) -> float:
    key = family.tied_kinds.get(kind, kind)
    if key not in thresholds.modules:
        raise ValueError(f"No quantile level for module kind {key!r}; thresholds have {sorted(thresholds.modules)}.")
    return thresholds.modules[key]


def provisional_books(
    step_rates: np.ndarray,
    module_rates: dict[str, np.ndarray],
    thresholds: InvarDiffThresholds,
    family: FamilyCalibration,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The first-pass booleans (SPEC.md A.3 step 3) that drive the second pass's frozen references."""
    T = len(step_rates)
    n_ns = warmup_steps(thresholds.nonskip_rate, T)
    step = force_compute(gate(step_rates, thresholds.step), n_ns)
    module_first = n_ns if family.provisional_module_warmup else 1
    modules = {
        kind: force_compute(gate(rates, module_level(thresholds, family, kind)), module_first)
        for kind, rates in module_rates.items()
    }
    if family.provisional_interplay:
        modules = interplay(step, modules)
    return step, modules


def final_books(
    first_step_rates: np.ndarray,
    corrected_step_rates: np.ndarray,
    corrected_module_rates: dict[str, np.ndarray],
    thresholds: InvarDiffThresholds,
    family: FamilyCalibration,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Final booleans (SPEC.md A.3 steps 5-6) from the corrected rates."""
    T = len(first_step_rates)
    n_ns = warmup_steps(thresholds.nonskip_rate, T)
    step_rates = corrected_step_rates if family.correct_step else first_step_rates
    step = force_compute(gate(step_rates, thresholds.step), n_ns)
    modules = {
        kind: force_compute(gate(rates, module_level(thresholds, family, kind)), n_ns)
        for kind, rates in corrected_module_rates.items()
    }
    return step, interplay(step, modules)
