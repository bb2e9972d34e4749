"""The rates artifact: what calibration measured, saved beside the plan so that plans can be rebuilt offline.

An ``.npz`` file (no pickles) with a JSON header and, per pass (``first``, ``corrected``), the per-run rates:
``<pass>/step`` of shape ``(N, T)`` and ``<pass>/<block_list>.<kind>`` of shape ``(N, T, L)``; a run is one sample
(one prompt or class with one seed). Entries 0 and T-1 are NaN (never measured, SPEC.md A.2.1).

What a threshold change needs: the second pass's corrected rates were measured against the provisional plan of
the *calibrated* thresholds. Rebuilding at those thresholds, or at any thresholds whose provisional plan is the
same, is exact. Other thresholds need a new second pass (``invardiff calibrate`` again); ``build_plan`` can
instead reuse the stored corrected rates (``correction="stored"``, an approximation) or skip the correction
(``correction="none"``), and records which in the plan's provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..families.calibration_spec import FamilyCalibration, InvarDiffThresholds
from ..plan import CachePlan, ModelFacts, PlanError
from .build import final_books, provisional_books


RATES_FORMAT = "invardiff-calibration-rates"
RATES_FORMAT_VERSION = 1
CORRECTIONS = ("exact", "stored", "none")


@dataclass
class CalibrationRates:
    model: ModelFacts
    num_steps: int
    thresholds: InvarDiffThresholds  # the calibrated thresholds (they made the provisional plan of pass 2)
    family_options: FamilyCalibration
    first_step: np.ndarray  # (N, T)
    first_modules: dict[str, np.ndarray]  # kind key -> (N, T, L)
    corrected_step: np.ndarray
    corrected_modules: dict[str, np.ndarray]
    scheduler: str | None = None
    epsilon: float = 1e-8
    provenance: dict = field(default_factory=dict)

    @property
    def num_runs(self) -> int:
        return self.first_step.shape[0]

    def mean(self, which: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run-averaged rates (mean of ratios over runs, SPEC.md A.2.3) of pass ``"first"`` or ``"corrected"``."""
        step = getattr(self, f"{which}_step")
        modules = getattr(self, f"{which}_modules")
        return step.mean(axis=0), {kind: rates.mean(axis=0) for kind, rates in modules.items()}

    def provisional(self, thresholds: InvarDiffThresholds | None = None):
        step, modules = self.mean("first")
        return provisional_books(step, modules, thresholds or self.thresholds, self.family_options)

    def build_plan(self, thresholds: InvarDiffThresholds | None = None, correction: str = "exact") -> CachePlan:
        """Build the final plan at ``thresholds`` (default: the calibrated ones).

        Args:
            correction (`str`): ``"exact"`` requires the provisional plan of ``thresholds`` to be the one the
                second pass measured (always true at the calibrated thresholds) and raises otherwise;
                ``"stored"`` uses the stored corrected rates anyway (approximate); ``"none"`` builds from the
                first pass only (no resampling correction).
        """
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}.")
        thresholds = thresholds or self.thresholds
        first_step, first_modules = self.mean("first")
        exact = _same_books(self.provisional(thresholds), self.provisional())
        if correction == "exact" and not exact:
            raise ValueError(
                "These thresholds give a different provisional plan than the calibrated ones "
                f"({self.thresholds.to_dict()}), so the stored corrected rates do not apply exactly. Re-run "
                "`invardiff calibrate` with these thresholds, or choose correction='stored' (reuse the stored "
                "corrected rates, approximate) or correction='none' (first pass only)."
            )
        if correction == "none":
            corrected_step, corrected_modules = first_step, first_modules
        else:
            corrected_step, corrected_modules = self.mean("corrected")
        step, modules = final_books(first_step, corrected_step, corrected_modules, thresholds, self.family_options)
        reuse: dict[str, dict[str, np.ndarray]] = {}
        for key, bits in modules.items():
            block_list, kind = key.split(".", 1)
            reuse.setdefault(block_list, {})[kind] = bits
        provenance = {
            "policy": "invardiff",
            "thresholds": thresholds.to_dict(),
            "family_options": self.family_options.to_dict(),
            "correction": "exact" if correction != "none" and exact else correction,
            "calibrated_thresholds": self.thresholds.to_dict(),
            "epsilon": self.epsilon,
            "calibration": self.provenance,
        }
        return CachePlan(self.model, self.num_steps, step, reuse, scheduler=self.scheduler, provenance=provenance)

    # ----- serialisation -----
    def save(self, path: str | Path) -> None:
        header = {
            "format": RATES_FORMAT,
            "format_version": RATES_FORMAT_VERSION,
            "model": self.model.to_dict(),
            "num_steps": self.num_steps,
            "scheduler": self.scheduler,
            "thresholds": self.thresholds.to_dict(),
            "family_options": self.family_options.to_dict(),
            "epsilon": self.epsilon,
            "provenance": self.provenance,
        }
        arrays = {
            "header": np.array(json.dumps(header)),
            "first/step": self.first_step,
            "corrected/step": self.corrected_step,
        }
        arrays.update({f"first/{k}": v for k, v in self.first_modules.items()})
        arrays.update({f"corrected/{k}": v for k, v in self.corrected_modules.items()})
        from ..files import atomic_path

        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationRates:
        try:
            archive = np.load(path, allow_pickle=False)
            header = json.loads(str(archive["header"]))
        except (OSError, ValueError, KeyError) as error:
            raise PlanError(f"{path} is not an invardiff rates file ({error}).") from None
        if header.get("format") != RATES_FORMAT or header.get("format_version") != RATES_FORMAT_VERSION:
            raise PlanError(
                f"{path}: expected {RATES_FORMAT} version {RATES_FORMAT_VERSION}, got {header.get('format')!r} "
                f"version {header.get('format_version')!r}."
            )
        model = ModelFacts.from_dict(header["model"])
        arrays = {name: archive[name] for name in archive.files if name != "header"}
        rates = cls(
            model=model,
            num_steps=header["num_steps"],
            thresholds=InvarDiffThresholds.from_dict(header["thresholds"]),
            family_options=FamilyCalibration(**header["family_options"]),
            first_step=arrays.pop("first/step"),
            corrected_step=arrays.pop("corrected/step"),
            first_modules={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("first/")},
            corrected_modules={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("corrected/")},
            scheduler=header["scheduler"],
            epsilon=header["epsilon"],
            provenance=header["provenance"],
        )
        rates.validate()
        return rates

    def validate(self) -> None:
        N, T = self.first_step.shape
        if T != self.num_steps or self.corrected_step.shape != (N, T):
            raise PlanError(
                f"Rates: step arrays must be (runs, {self.num_steps}), got {self.first_step.shape} and "
                f"{self.corrected_step.shape}."
            )
        expected = {f"{b.name}.{k}": b.num_layers for b in self.model.block_lists for k in b.module_kinds}
        for name, modules in [("first", self.first_modules), ("corrected", self.corrected_modules)]:
            if sorted(modules) != sorted(expected):
                raise PlanError(f"Rates: {name} pass has kinds {sorted(modules)}, expected {sorted(expected)}.")
            for kind, layers in expected.items():
                if modules[kind].shape != (N, T, layers):
                    raise PlanError(f"Rates: {name}/{kind} must be ({N}, {T}, {layers}), got {modules[kind].shape}.")


def _same_books(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and all(np.array_equal(a[1][k], b[1][k]) for k in a[1])
