"""Records InvarDiff change rates during full-compute runs, as an observer of the cache engine.

For every stream (the step stream H, and one per layer and module kind) the rate at index ``j = k - 1``, stored
when call ``k`` finishes, is ``|f_k - curr|_1 / (|curr - prev|_1 + eps)`` per sample, where ``(prev, curr)`` is the
stream's reference pair. After each rate the references shift (``prev <- curr``, ``curr <- f_k``), unless the
provisional plan reuses index ``j`` (SPEC.md A.3 step 4): the first reuse of a run shifts once and freezes, later
ones leave the references alone. With a provisional plan that reuses nothing this is the plain first-pass rate.

The rate needs ``curr`` and only the per-sample scalar ``|curr - prev|_1``, which is the previous rate's numerator
whenever the references shift. So each stream keeps ONE feature, ``curr``, in the dtype the model produced it in,
plus a ``(B,)`` float32 denominator. Differences and norms are computed in float32:

* float32 models: the rates are bit-for-bit those of the former two-float32-feature recorder.
* bfloat16 / float16 models: the reference is kept in the model's dtype, which is the dtype of the feature
  itself, so no information is lost: upcasting it to float32 is exact, and the rates are again exactly those of a
  recorder that kept float32 copies (half the memory of one float32 copy, a quarter of the former pair). What
  the rates cannot see is anything below the model's own precision: two steps whose features round to the same
  bfloat16 values have a zero change.

``offload="cpu"`` keeps the references in host memory (pinned, copied asynchronously on CUDA) when the device
is short of memory; each rate then copies the reference back for the difference (one feature per stream and
step over the host link). The rates are the same either way.

Host syncs: rates stay on the device as they are computed and go to the host in one transfer per device when
the next step begins (or when :meth:`rates` or :meth:`finish` is called), where the NaN / inf check runs: at
most one host sync per denoising step, whatever the number of streams.

Memory is one feature per stream plus samples x steps x layers rates, whatever the number of steps.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.state import UnitRef, tensor_bytes
from ..families import FamilySpec


OFFLOAD_CHOICES = (None, "cpu")


class CalibrationError(RuntimeError):
    """A calibration run produced unusable features (NaN or inf)."""


class _Stream:
    __slots__ = ("reference", "change", "frozen", "rates")

    def __init__(self):
        self.reference = None  # curr: the anchor feature, in the feature's dtype (host memory with offload="cpu")
        self.change = None  # (B,) float32 |curr - prev|_1 on the feature's device: the rate's denominator
        self.frozen = False
        self.rates: dict[int, np.ndarray] = {}  # index j -> (B,) rates


class RateRecorder:
    """Engine observer for one calibration pass.

    Args:
        units: the engine's unit list; family: its family spec; num_steps: T.
        provisional: ``{stream_key: (T,) bool}`` reuse of the provisional plan, where a stream key is ``"step"``
            or ``(block_list.kind, layer)``; missing streams never freeze (first pass).
        epsilon: added to the denominator (the official code adds it to every element of the difference).
        offload: ``"cpu"`` keeps the reference features in host memory; ``None`` keeps them with the features.
        branches: the CFG branches (``cache_context`` names) measured; the others run unobserved. ``None``: all.
    """

    def __init__(
        self,
        units: list[UnitRef],
        family: FamilySpec,
        num_steps: int,
        provisional=None,
        epsilon=1e-8,
        offload: str | None = None,
        branches: tuple[str, ...] | None = None,
    ):
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}.")
        self.num_steps = num_steps
        self.epsilon = epsilon
        self.offload = offload
        self.provisional = provisional or {}
        self.measured_branches = None if branches is None else frozenset(branches)
        self.branches: dict[str, dict] = {}  # branch name -> {stream key: _Stream} of the current run
        self.last_step: dict[str, int] = {}
        self.finished: list[dict] = []  # stream dicts of completed runs (earlier pipeline calls)
        self._pending: list[tuple] = []  # (stream, branch, key, k, (B,) rate on the device) not yet on the host
        self._pending_step: int | None = None
        # Layers per block list: a kind's rate matrix spans them all, NaN (never reused) where a block lacks the unit.
        self.family = family
        self.num_layers = {}
        for unit in units:
            self.num_layers[unit.block_list] = max(self.num_layers.get(unit.block_list, 0), unit.layer + 1)
        self.unit_specs = []
        for unit in units:
            spec = next(u for u in family.block_list(unit.block_list).units if u.name == unit.name)
            self.unit_specs.append((unit, spec))

    # ----- engine observer interface -----
    def on_hidden(self, state, hidden: torch.Tensor) -> None:
        if self._measures(state):
            self._observe(state, "step", hidden)

    def on_unit(self, state, unit_index: int, output) -> None:
        if not self._measures(state):
            return
        unit, spec = self.unit_specs[unit_index]
        for kind, feature in spec.kind_features(output).items():
            self._observe(state, (f"{unit.block_list}.{kind}", unit.layer), feature)

    def _measures(self, state) -> bool:
        return self.measured_branches is None or state.name in self.measured_branches

    # ----- recording -----
    @torch.no_grad()
    def _observe(self, state, key, feature: torch.Tensor) -> None:
        k = state.step
        if self._pending and k != self._pending_step:
            self._flush()  # a new step (or a new run) began: the previous step's rates go to the host together
        if k == 0 and self.last_step.get(state.name, 0) > 0:
            self._finish_run(state.name)  # a new pipeline call starts new runs
        self.last_step[state.name] = k
        streams = self.branches.setdefault(state.name, {})
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = _Stream()
        feature = feature.detach()  # (B, ...) in the model's dtype
        if k >= 1:
            if stream.reference is None:
                raise CalibrationError(
                    f"Step {k} of {_name(key)} arrived without step {k - 1}; runs must be complete."
                )
            change = _l1_distance(feature, stream.reference)  # (B,) |f_k - curr|_1, float32, on the device
            if k >= 2:
                j = k - 1
                self._pending.append((stream, state.name, key, k, change / (stream.change + self.epsilon)))
                self._pending_step = k
                reuse = key in self.provisional and bool(self.provisional[key][j])
                if reuse and stream.frozen:
                    return  # inside a provisional reuse run: references stay at the run's anchor
                stream.frozen = reuse
            stream.change = change  # after the shift |curr - prev|_1 is this step's numerator
        stream.reference = self._keep(feature, stream.reference)

    def _keep(self, feature: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """``feature`` as the new reference: copied into the old reference's buffer when it fits, so that the
        recorder owns its memory (no alias of a model output) and allocates nothing after a run's first step."""
        offloaded = self.offload == "cpu" and feature.device.type != "meta"  # meta: memory estimates
        device = torch.device("cpu") if offloaded else feature.device
        fits = (
            reference is not None
            and reference.shape == feature.shape
            and reference.dtype == feature.dtype
            and reference.device == device
        )
        if not fits:
            pinned = device.type == "cpu" and feature.is_cuda  # asynchronous device-to-host copies
            reference = torch.empty(feature.shape, dtype=feature.dtype, device=device, pin_memory=pinned)
        return reference.copy_(feature, non_blocking=True)

    def _flush(self) -> None:
        """Move the pending rates to the host: one transfer per device, then the NaN / inf check."""
        pending, self._pending, self._pending_step = self._pending, [], None
        by_device: dict[torch.device, list[tuple]] = {}
        for entry in pending:
            by_device.setdefault(entry[-1].device, []).append(entry)
        for entries in by_device.values():
            values = torch.stack([entry[-1] for entry in entries]).tolist()  # the host sync: (streams, B) floats
            for (stream, branch, key, k, _), row in zip(entries, values, strict=True):
                rates = np.array(row, dtype=np.float64)  # float32 values, exactly
                if not np.isfinite(rates).all():
                    raise CalibrationError(
                        f"Non-finite change rate at step {k} for {_name(key)} on branch {branch!r}: the model "
                        f"produced NaN or inf features. Check the model weights and dtype (float16 overflows?)."
                    )
                stream.rates[k - 1] = rates

    def _finish_run(self, branch: str) -> None:
        streams = self.branches.pop(branch)
        for stream in streams.values():
            stream.reference = stream.change = None  # the run is over: free its features
        self.finished.append(streams)

    def finish(self) -> None:
        """End of the pass: move the last rates to the host, then :meth:`release`."""
        self._flush()
        self.release()

    def release(self) -> None:
        """Free every reference feature (runs in progress end); the rates on the host stay."""
        self._pending, self._pending_step = [], None
        for branch in list(self.branches):
            self._finish_run(branch)
        self.last_step.clear()

    def held_bytes(self) -> dict[str, int]:
        """Bytes the recorder holds now for the runs in progress: reference features, and the per-sample scalars
        (denominators, rates not yet on the host). Host bytes are included when references are offloaded."""
        streams = [stream for branch in self.branches.values() for stream in branch.values()]
        return {
            "references": sum(tensor_bytes(stream.reference) for stream in streams),
            "scalars": sum(tensor_bytes(stream.change) for stream in streams)
            + sum(tensor_bytes(entry[-1]) for entry in self._pending),
            "streams": len(streams),
        }

    def rates(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-run rates: step ``(N, T)`` and per kind ``(N, T, L)``; a run is one sample of one branch.
        Indices 0 and T-1 are NaN (never measured)."""
        self._flush()
        T = self.num_steps
        step_runs, module_runs = [], {}
        for streams in [*self.finished, *self.branches.values()]:
            step_runs.append(_stack(streams["step"], T))
            layers: dict[str, dict[int, np.ndarray]] = {}
            for key, stream in streams.items():
                if key != "step":
                    layers.setdefault(key[0], {})[key[1]] = _stack(stream, T)
            for block_list in self.family.block_lists:  # a kind no block has: all NaN
                for kind in block_list.module_kinds:
                    if block_list.attr in self.num_layers:
                        layers.setdefault(f"{block_list.attr}.{kind}", {})
            for kind, per_layer in layers.items():
                any_layer = next(iter(per_layer.values()), step_runs[-1])
                matrix = np.full((*any_layer.shape, self.num_layers[kind.rsplit(".", 1)[0]]), np.nan)  # (B, T, L)
                for layer, rates in per_layer.items():
                    matrix[..., layer] = rates
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


_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def _l1_distance(feature: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``|feature - reference|_1`` per sample in float32, with one float32 temporary of the feature's size."""
    reference = reference.to(feature.device, non_blocking=True)  # offloaded references come back for the step
    if reference.dtype not in _EXACT_IN_FLOAT32:
        reference = reference.float()
    if feature.dtype == torch.float32:
        difference = feature - reference
    else:
        difference = feature.float().sub_(reference)  # the upcast copy is a fresh buffer: subtract in place
    return difference.abs_().flatten(1).sum(dim=1)  # (B,)


def _name(key) -> str:
    return "the pre-head hidden state" if key == "step" else f"{key[0]} layer {key[1]}"
