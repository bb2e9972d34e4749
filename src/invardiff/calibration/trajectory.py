"""Trajectory statistics: what the budgeted plan search and the extrapolation fit need from full-compute runs.

For every stream (the pre-head hidden state H, ``"step"``, and every reusable unit's output, keyed by the unit's
FQN ``transformer_blocks.3.attn``) a full-compute run records the windowed Gram matrix of its features::

    gram[t, i] = sum over calibration samples of <f_t, f_(t-i)>,   i = 0 ... window

Every quantity the search and the fit use is a linear combination of these inner products, for any plan whose
reuse runs and anchor gaps stay inside the window:

* reuse error of anchor ``a`` at step ``t``: ``|f_t - f_a|^2``;
* least-squares extrapolation from the last two computed values ``f_p, f_a``: ``c = <f_t - f_a, f_a - f_p> /
  |f_a - f_p|^2`` (pooled over samples), residual ``|f_t - f_a|^2 - c <f_t - f_a, f_a - f_p>``;
* at second order from the last three ``f_q, f_p, f_a``: ``f_t - f_a ~ c1 d1 + c2 d2`` with ``d1 = f_a - f_p``,
  ``d2 = f_a - 2 f_p + f_q``, solved from the 2 x 2 Gram matrix of ``d1, d2``.

So the statistics are ``T x (window + 1)`` float64 numbers per stream, whatever the model size; the recorder holds
``window + 1`` features per stream while a run is in progress (that is the memory bound), in the model's dtype.
Inner products are accumulated in float64 (one float64 temporary of one feature's size) because the errors are
small differences of large inner products. They stay on the device until the run ends: no host sync per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.state import UnitRef
from ..plan import ModelFacts, PlanError
from ..plan_extrapolation import MAX_COEFFICIENT


TRAJECTORY_FORMAT = "invardiff-trajectory-stats"
TRAJECTORY_FORMAT_VERSION = 1
STEP_STREAM = "step"
# fit_scale_free: the two computed values count as parallel (no extrapolation) when the determinant of their Gram
# matrix is below this fraction of the product of their squared norms (sin^2 of the angle between them).
PARALLEL_TOLERANCE = 1e-12


@dataclass
class TrajectoryStats:
    """Windowed Gram matrices of full-compute calibration trajectories (see the module docstring).

    Attributes:
        gram: ``{stream: (T, window + 1) float64}``; ``gram[t, i]`` sums ``<f_t, f_(t-i)>`` over samples.
        sizes: elements of one sample's feature, per stream (units are compared with H per element).
        num_samples: calibration samples (rows) summed into the Gram matrices.
    """

    model: ModelFacts
    num_steps: int
    window: int
    gram: dict[str, np.ndarray]
    sizes: dict[str, int]
    num_samples: int
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        if STEP_STREAM not in self.gram:
            raise ValueError("Trajectory statistics need the step stream (the pre-head hidden state).")
        for name, matrix in self.gram.items():
            if matrix.shape != (self.num_steps, self.window + 1):
                raise ValueError(
                    f"Gram matrix of {name!r} must have shape ({self.num_steps}, {self.window + 1}), "
                    f"got {matrix.shape}."
                )

    def within(self, window: int) -> TrajectoryStats:
        """The same statistics as if recorded with the smaller ``window`` (the first ``window + 1`` lags): what a
        search whose runs stay within ``window`` sees, while a second-order refit reads further back."""
        if not 1 <= window <= self.window:
            raise ValueError(f"window must be from 1 to the recorded {self.window}, got {window}.")
        gram = {name: matrix[:, : window + 1].copy() for name, matrix in self.gram.items()}
        return dataclasses.replace(self, window=window, gram=gram)

    @property
    def unit_streams(self) -> list[str]:
        return [name for name in self.gram if name != STEP_STREAM]

    def inner(self, stream: str, s: int, u: int) -> float:
        """``sum <f_s, f_u>`` over samples; ``|s - u|`` must be at most the window."""
        s, u = max(s, u), min(s, u)
        if s - u > self.window:
            raise ValueError(f"Steps {u} and {s} are further apart than the recorded window {self.window}.")
        return float(self.gram[stream][s, s - u])

    def reuse_error(self, stream: str, anchor: int, t: int) -> float:
        """``sum |f_t - f_anchor|^2``: the squared error of reusing step ``anchor``'s value at step ``t``."""
        value = self.inner(stream, t, t) - 2 * self.inner(stream, t, anchor) + self.inner(stream, anchor, anchor)
        return max(value, 0.0)

    def fit(self, stream: str, previous: int, anchor: int, t: int) -> tuple[float, float]:
        """Least-squares ``c`` of ``f_t ~ f_anchor + c (f_anchor - f_previous)`` pooled over samples, and the
        squared residual. ``c = 0`` (plain reuse) when the two computed values are equal; ``c`` is clipped to the
        range a plan may hold (``plan_extrapolation.MAX_COEFFICIENT``), which still errs no more than plain reuse
        (the squared error is convex in ``c`` and the clipped value lies between 0 and the optimum)."""
        if not previous < anchor < t:
            raise ValueError(f"Extrapolation needs previous < anchor < t, got {previous}, {anchor}, {t}.")
        delta = self.reuse_error(stream, previous, anchor)  # |f_a - f_p|^2
        cross = (
            self.inner(stream, t, anchor)
            - self.inner(stream, t, previous)
            - self.inner(stream, anchor, anchor)
            + self.inner(stream, anchor, previous)
        )  # <f_t - f_a, f_a - f_p>
        plain = self.reuse_error(stream, anchor, t)
        if delta <= 0.0:
            return 0.0, plain
        coefficient = cross / delta
        if abs(coefficient) <= MAX_COEFFICIENT:
            return coefficient, max(plain - coefficient * cross, 0.0)
        coefficient = math.copysign(MAX_COEFFICIENT, coefficient)
        return coefficient, max(plain - 2 * coefficient * cross + coefficient**2 * delta, 0.0)

    def fit_second_order(self, stream: str, earlier: int, previous: int, anchor: int, t: int) -> tuple[float, ...]:
        """Least-squares ``(c1, c2)`` of ``f_t ~ f_a + c1 (f_a - f_p) + c2 (f_a - 2 f_p + f_q)`` pooled over samples
        (``f_q, f_p, f_a`` the values at ``earlier < previous < anchor``), and the squared residual:
        ``(c1, c2, squared)``. Where the two differences are parallel (their Gram determinant below
        :data:`PARALLEL_TOLERANCE` of the product of their squared norms) or a coefficient falls outside the range a
        plan may hold, the first-order fit (:meth:`fit`) with ``c2 = 0``: never worse than it on these samples."""
        if not earlier < previous < anchor < t:
            raise ValueError(
                f"Second-order extrapolation needs earlier < previous < anchor < t, got {earlier}, {previous}, "
                f"{anchor}, {t}."
            )
        vectors = {"d1": {anchor: 1.0, previous: -1.0}, "d2": {anchor: 1.0, previous: -2.0, earlier: 1.0}}
        vectors["r"] = {t: 1.0, anchor: -1.0}

        def dot(x: str, y: str) -> float:
            return sum(a * b * self.inner(stream, s, u) for s, a in vectors[x].items() for u, b in vectors[y].items())

        gram = np.array([[dot("d1", "d1"), dot("d1", "d2")], [dot("d1", "d2"), dot("d2", "d2")]])
        right = np.array([dot("d1", "r"), dot("d2", "r")])
        first, squared = self.fit(stream, previous, anchor, t)
        determinant = gram[0, 0] * gram[1, 1] - gram[0, 1] ** 2
        if determinant <= PARALLEL_TOLERANCE * gram[0, 0] * gram[1, 1]:
            return first, 0.0, squared
        c1, c2 = np.linalg.solve(gram, right)
        second = max(dot("r", "r") - float(right @ (c1, c2)), 0.0)
        if max(abs(c1), abs(c2)) > MAX_COEFFICIENT or second >= squared:  # the latter: rounding only
            return first, 0.0, squared
        return float(c1), float(c2), second

    def scale_free_error(self, stream: str, anchor: int, t: int) -> float:
        """``min over g >= 0 of sum |f_t - g f_anchor|^2`` (pooled over samples): the reuse error up to the scale of
        the reused value, which is all a head that normalises its input (a LayerNorm without affine) sees."""
        return self._scale_free(stream, t, {anchor: 1.0})

    def fit_scale_free(self, stream: str, previous: int, anchor: int, t: int) -> tuple[float, float]:
        """``c`` of ``f_t ~ g (f_anchor + c (f_anchor - f_previous))`` with a free scale ``g`` (pooled over samples),
        and the squared residual with the best ``g >= 0``. The least-squares fit ``f_t ~ alpha f_anchor + beta
        f_previous`` gives ``g = alpha + beta`` and ``c = -beta / g``. ``c = 0`` when the two computed values are
        parallel or ``g <= 0``; ``c`` is clipped like :meth:`fit`'s (the residual is then that of the clipped ``c``).

        Why: a head that normalises H per token ignores H's scale, and the plain fit (:meth:`fit`) spends its one
        coefficient on the scale too. Measured (``benchmarks/results/frontier/README.md``, flux-shapes at 4x, gaps of
        5-6 steps): on the committed schedule 36.7 dB held out against 34.5 dB with :meth:`fit` on the sweep's 4
        evaluation images, but 36.4 against 38.3 dB on 12; not better in general."""
        if not previous < anchor < t:
            raise ValueError(f"Extrapolation needs previous < anchor < t, got {previous}, {anchor}, {t}.")
        aa, pp = self.inner(stream, anchor, anchor), self.inner(stream, previous, previous)
        ap = self.inner(stream, anchor, previous)
        ta, tp = self.inner(stream, t, anchor), self.inner(stream, t, previous)
        determinant = aa * pp - ap * ap
        coefficient = 0.0
        if determinant > PARALLEL_TOLERANCE * aa * pp:
            alpha = (ta * pp - tp * ap) / determinant
            beta = (tp * aa - ta * ap) / determinant
            if alpha + beta > 0.0:
                coefficient = float(np.clip(-beta / (alpha + beta), -MAX_COEFFICIENT, MAX_COEFFICIENT))
        return coefficient, self._scale_free(stream, t, {anchor: 1.0 + coefficient, previous: -coefficient})

    def _scale_free(self, stream: str, t: int, weights: dict[int, float]) -> float:
        """``min over g >= 0 of sum |f_t - g v|^2`` for ``v = sum_s weights[s] f_s``: ``|f_t|^2 - max(<f_t, v>, 0)^2
        / |v|^2`` (``|f_t|^2`` when ``v`` is zero)."""
        tv = sum(w * self.inner(stream, t, s) for s, w in weights.items())
        vv = sum(w * u * self.inner(stream, s, r) for s, w in weights.items() for r, u in weights.items())
        tt = self.inner(stream, t, t)
        if vv <= 0.0:
            return max(tt, 0.0)
        return max(tt - max(tv, 0.0) ** 2 / vv, 0.0)

    def relative(self, stream: str, squared_error: float, t: int) -> float:
        """An error on the scale of H at step ``t``: RMS of the error over RMS of H (per element, so that a unit's
        error and a whole step's error are comparable: a reused unit adds its error to the residual stream)."""
        h_norm = self.inner(STEP_STREAM, t, t) / self.sizes[STEP_STREAM]
        if h_norm <= 0.0:
            return 0.0 if squared_error == 0.0 else math.inf
        return math.sqrt(squared_error / self.sizes[stream] / h_norm)

    # ----- files -----
    def save(self, path: str | Path) -> None:
        header = {
            "format": TRAJECTORY_FORMAT,
            "format_version": TRAJECTORY_FORMAT_VERSION,
            "model": self.model.to_dict(),
            "num_steps": self.num_steps,
            "window": self.window,
            "sizes": self.sizes,
            "num_samples": self.num_samples,
            "provenance": self.provenance,
        }
        arrays = {f"gram/{name}": matrix for name, matrix in self.gram.items()}
        from ..files import atomic_path

        # a handle: np.savez would append .npz to a name without it
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> TrajectoryStats:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != TRAJECTORY_FORMAT or header.get("format_version") != 1:
                raise PlanError(
                    f"{path} is not an invardiff trajectory file (format {header.get('format')!r}, version "
                    f"{header.get('format_version')!r}); expected {TRAJECTORY_FORMAT!r} version 1."
                )
            gram = {key.removeprefix("gram/"): data[key] for key in data.files if key.startswith("gram/")}
        return cls(
            ModelFacts.from_dict(header["model"]),
            header["num_steps"],
            header["window"],
            gram,
            header["sizes"],
            header["num_samples"],
            header.get("provenance", {}),
        )


class TrajectoryRecorder:
    """Engine observer (``on_hidden`` / ``on_unit``, as :class:`RecordConfig` wants) that accumulates the Gram
    matrices of every stream over full-compute runs; :meth:`stats` returns them."""

    def __init__(self, units: list[UnitRef], model: ModelFacts, num_steps: int, window: int):
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2 (steps a reuse may span), got {window!r}.")
        self.unit_names = [unit.fqn for unit in units]
        self.model = model
        self.num_steps = num_steps
        self.window = window
        self.gram: dict[str, torch.Tensor] = {}  # on the features' device until stats() is called
        self.sizes: dict[str, int] = {}
        self.history: dict[tuple[str, str], deque] = {}  # (branch, stream) -> last window+1 features of the run
        self.num_samples = 0

    def on_hidden(self, state, hidden: torch.Tensor) -> None:
        if state.step == 0:
            self.num_samples += hidden.shape[0]
        self._observe(state, STEP_STREAM, hidden)

    def on_unit(self, state, unit_index: int, output) -> None:
        self._observe(state, self.unit_names[unit_index], output)

    @torch.no_grad()
    def _observe(self, state, stream: str, output) -> None:
        feature = _flatten(output)  # (B, N) in the model's dtype, a copy the model cannot overwrite
        t = state.step
        key = (state.name, stream)
        history = self.history.get(key)
        if t == 0 or history is None:
            if t != 0:
                raise ValueError(f"Stream {stream!r} started at step {t}; trajectories must be recorded from step 0.")
            history = self.history[key] = deque(maxlen=self.window + 1)
        elif len(history) != min(t, self.window + 1):
            raise ValueError(f"Stream {stream!r} skipped a step before step {t}; runs must be complete.")
        history.append(feature)
        gram = self.gram.get(stream)
        if gram is None:
            gram = self.gram[stream] = torch.zeros(
                self.num_steps, self.window + 1, dtype=torch.float64, device=feature.device
            )
            self.sizes[stream] = feature.shape[1]
        current = feature.double()
        for lag, earlier in enumerate(reversed(history)):  # lag 0 is the feature itself
            gram[t, lag] += (current * earlier.double()).sum()

    def release(self) -> None:
        self.history.clear()

    def stats(self, provenance: dict | None = None) -> TrajectoryStats:
        self.release()
        gram = {name: matrix.cpu().numpy() for name, matrix in self.gram.items()}  # the one transfer
        return TrajectoryStats(
            self.model, self.num_steps, self.window, gram, dict(self.sizes), self.num_samples, provenance or {}
        )


def _flatten(output) -> torch.Tensor:
    """A unit output (a tensor or a tuple of tensors, e.g. Flux joint attention) as one ``(B, N)`` copy."""
    tensors = [output] if torch.is_tensor(output) else [item for item in output if torch.is_tensor(item)]
    return torch.cat([tensor.detach().reshape(tensor.shape[0], -1) for tensor in tensors], dim=1).clone()


def refuse_experts(pipe) -> None:
    """The budgeted search plans one transformer over the whole schedule; a pipeline that switches transformers
    (Wan2.2's experts) would need one search per expert and a split of the budget between them, which is not
    implemented: raise NotImplementedError saying what to do instead."""
    from .. import api

    experts = [expert.attr for expert in api.pipeline_experts(pipe)]
    if experts:
        raise NotImplementedError(
            f"Budgeted calibration (--budget / --pareto) of a pipeline that switches transformers along the schedule "
            f"({type(pipe).__name__} with {', '.join(experts)}) is not implemented; calibrate it with thresholds "
            f"(--preset / --thresholds), which builds one plan per expert."
        )


def record_trajectories(
    pipe,
    *,
    num_inference_steps: int,
    cases: list[tuple],
    window: int = 6,
    batch_size: int | None = None,
    pipeline_kwargs: dict | None = None,
) -> TrajectoryStats:
    """One full-compute pass over the calibration ``cases`` (``[(prompt or class id, seed or latents), ...]``),
    at the pipeline's default guidance scale unless ``pipeline_kwargs`` sets one, recording
    :class:`TrajectoryStats` for :func:`invardiff.calibration.search.search_plan`.

    Cost: one full-compute sampling run per case, plus ``window + 1`` inner products per stream and step.
    Memory: ``window + 1`` features per stream and sample of the batch in flight (``batch_size``, default all
    cases in one call). ``window`` bounds the longest reuse run a searched plan may contain.
    """
    from .. import api
    from ..engine.install import enumerate_units
    from ..families import resolve_family
    from ..plan import CachePlan
    from .record_policy import RecordConfig
    from .run import call_pipeline, check_call_size, check_cases, noise_record, sampling_defaults

    refuse_experts(pipe)
    cases = check_cases(cases)
    family = resolve_family(pipe.transformer)
    facts = ModelFacts.for_family(family.name, family.num_layers(pipe.transformer))
    call_kwargs = {
        "num_inference_steps": num_inference_steps,
        **sampling_defaults(pipe, family.name),
        **(pipeline_kwargs or {}),
    }
    check_call_size(pipe, family.name, call_kwargs)
    recorder = TrajectoryRecorder(enumerate_units(pipe.transformer, family), facts, num_inference_steps, window)
    batch_size = batch_size or len(cases)
    api.enable(pipe, RecordConfig(CachePlan.reuse_nothing(facts, num_inference_steps), recorder))
    try:
        for start in range(0, len(cases), batch_size):
            call_pipeline(pipe, family.name, cases[start : start + batch_size], call_kwargs)
    finally:
        api.disable(pipe)
        recorder.release()
    provenance = {
        "cases": [[item, noise_record(noise)] for item, noise in cases],
        "pipeline_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "scheduler": type(pipe.scheduler).__name__,
        "timesteps": [float(t) for t in pipe.scheduler.timesteps.tolist()],
    }
    return recorder.stats(provenance)
