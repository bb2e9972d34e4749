"""Records InvarDiff change rates during full-compute runs, as an observer of the cache engine.

For every stream (the step stream H, and one per layer and module kind) it keeps a reference pair
``(prev, curr)`` of float32 features and, per sample, the rate ``|f_k - curr|_1 / (|curr - prev|_1 + eps)``
stored at index ``j = k - 1`` when call ``k`` finishes. After each rate the references shift, unless the
provisional plan reuses index ``j`` (SPEC.md A.3 step 4): the first reuse of a run shifts once and freezes, later
ones leave the references alone. With a provisional plan that reuses nothing this is the plain first-pass rate.

Memory is two features per stream plus samples x steps x layers rates, whatever the number of steps.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.state import UnitRef
from ..families import FamilySpec


class CalibrationError(RuntimeError):
    """A calibration run produced unusable features (NaN or inf)."""


class _Stream:
    __slots__ = ("prev", "curr", "frozen", "rates")

    def __init__(self):
        self.prev = None
        self.curr = None
        self.frozen = False
        self.rates: dict[int, np.ndarray] = {}  # index j -> (B,) rates


class RateRecorder:
    """Engine observer for one calibration pass.

    Args:
        units: the engine's unit list; family: its family spec; num_steps: T.
        provisional: ``{stream_key: (T,) bool}`` reuse of the provisional plan, where a stream key is ``"step"``
            or ``(block_list.kind, layer)``; missing streams never freeze (first pass).
        epsilon: added to the denominator (the official code adds it to every element of the difference).
    """

    def __init__(self, units: list[UnitRef], family: FamilySpec, num_steps: int, provisional=None, epsilon=1e-8):
        self.num_steps = num_steps
        self.epsilon = epsilon
        self.provisional = provisional or {}
        self.branches: dict[str, dict] = {}  # branch name -> {stream key: _Stream} of the current run
        self.last_step: dict[str, int] = {}
        self.finished: list[dict] = []  # stream dicts of completed runs (earlier pipeline calls)
        self.unit_specs = []
        for unit in units:
            spec = next(u for u in family.block_list(unit.block_list).units if u.name == unit.name)
            self.unit_specs.append((unit, spec))

    # ----- engine observer interface -----
    def on_hidden(self, state, hidden: torch.Tensor) -> None:
        self._observe(state, "step", hidden)

    def on_unit(self, state, unit_index: int, output) -> None:
        unit, spec = self.unit_specs[unit_index]
        for kind, feature in spec.kind_features(output).items():
            self._observe(state, (f"{unit.block_list}.{kind}", unit.layer), feature)

    # ----- recording -----
    @torch.no_grad()
    def _observe(self, state, key, feature: torch.Tensor) -> None:
        if state.step == 0 and self.last_step.get(state.name, 0) > 0:
            self.finished.append(self.branches.pop(state.name))  # a new pipeline call starts new runs
        self.last_step[state.name] = state.step
        streams = self.branches.setdefault(state.name, {})
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = _Stream()
        feature = feature.detach().float()  # (B, ...) norms in float32 whatever the model's dtype
        k = state.step
        if k >= 2:
            j = k - 1
            numerator = _l1_per_sample(feature - stream.curr)
            denominator = _l1_per_sample(stream.curr - stream.prev)
            rates = (numerator / (denominator + self.epsilon)).cpu().numpy()
            if not np.isfinite(rates).all():
                raise CalibrationError(
                    f"Non-finite change rate at step {k} for {_name(key)} on branch {state.name!r}: the model "
                    f"produced NaN or inf features. Check the model weights and dtype (float16 overflows?)."
                )
            stream.rates[j] = rates
            reuse = key in self.provisional and bool(self.provisional[key][j])
            if reuse and stream.frozen:
                return  # inside a provisional reuse run: references stay at the run's anchor
            stream.frozen = reuse
        if k >= 1 and stream.curr is None:
            raise CalibrationError(f"Step {k} of {_name(key)} arrived without step {k - 1}; runs must be complete.")
        stream.prev, stream.curr = stream.curr, feature

    def rates(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-run rates: step ``(N, T)`` and per kind ``(N, T, L)``; a run is one sample of one branch.
        Indices 0 and T-1 are NaN (never measured)."""
        T = self.num_steps
        step_runs, module_runs = [], {}
        for streams in [*self.finished, *self.branches.values()]:
            step_runs.append(_stack(streams["step"], T))
            layers: dict[str, dict[int, np.ndarray]] = {}
            for key, stream in streams.items():
                if key != "step":
                    layers.setdefault(key[0], {})[key[1]] = _stack(stream, T)
            for kind, per_layer in layers.items():
                matrix = np.stack([per_layer[layer] for layer in sorted(per_layer)], axis=-1)  # (B, T, L)
                module_runs.setdefault(kind, []).append(matrix)
        return np.concatenate(step_runs), {kind: np.concatenate(runs) for kind, runs in module_runs.items()}


def _stack(stream: _Stream, T: int) -> np.ndarray:
    batch = len(next(iter(stream.rates.values()))) if stream.rates else 0
    out = np.full((batch, T), np.nan)
    missing = [j for j in range(1, T - 1) if j not in stream.rates]
    if missing:
        raise CalibrationError(f"The run stopped early: no rate at steps {missing}; calibration needs complete runs.")
    for j, values in stream.rates.items():
        out[:, j] = values
    return out


def _l1_per_sample(difference: torch.Tensor) -> torch.Tensor:
    return difference.abs().flatten(1).sum(dim=1)  # (B,)


def _name(key) -> str:
    return "the pre-head hidden state" if key == "step" else f"{key[0]} layer {key[1]}"
