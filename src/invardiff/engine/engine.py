"""The cache engine: resolves the step and branch of every transformer call and owns the cached tensors.

One engine is attached to one transformer by :func:`invardiff.enable`. Its hooks (``hooks.py``) call into it; a
policy (``policy.py``) tells it what to do. The step index of a call comes from, in this order:

1. an explicit ``step_index`` given by the caller (``invardiff.cache_context(transformer, name, step_index=i)`` or
   diffusers' ``transformer.cache_context(name, step_index=i)``);
2. the pipeline passed to ``enable``: its scheduler's timesteps. A new ``timesteps`` tensor means a new pipeline
   call (``set_timesteps`` ran): all state resets, and the schedule's length must equal the plan's step count.
   Each call's timestep must be the next step of its branch's schedule; anything else is an error, never drift.

CFG: each ``cache_context`` name (``"cond"``, ``"uncond"``) has its own state; a call without a context name uses
one ``"default"`` state, which is right for pipelines that batch the branches (DiT).
"""

from __future__ import annotations

import inspect

import numpy as np

from ..families import FamilySpec, TransformerCall
from ..plan import PlanError
from .policy import CachePolicy
from .state import COMPUTED, NOT_RUN, REUSED, BranchState, UnitRef, tensor_bytes


DEFAULT_BRANCH = "default"


class EngineError(RuntimeError):
    """A run does not follow the plan (wrong step order, batch size or resolution change, ...)."""


class CacheEngine:
    def __init__(self, transformer, family: FamilySpec, policy: CachePolicy, units: list[UnitRef], pipeline=None):
        self.family = family
        self.transformer = transformer
        self.policy = policy
        self.units = units
        self.pipeline = pipeline
        self.signature = inspect.signature(transformer.forward)
        self.branches: dict[str, BranchState] = {}
        self.active: BranchState | None = None
        self.explicit_context = None  # set by invardiff.cache_context
        self.diffusers_context = None  # callable returning diffusers' current CacheContext (or None)
        self.observer = None  # calibration: sees every computed unit output and every pre-head hidden state
        self.probe = None  # the probe policies' controller (dicache.controller.ProbeController), else None
        self._schedule = None
        self._schedule_values: np.ndarray | None = None
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        self.all_outputs_bytes = 0  # what keeping every unit output and H of one step would take

    # ----- call lifecycle (called by the step hook) -----
    def begin_call(self, args: tuple, kwargs: dict) -> BranchState:
        call = TransformerCall(self.signature, args, kwargs)
        context = self.explicit_context or (self.diffusers_context() if self.diffusers_context else None)
        name = getattr(context, "name", context) or DEFAULT_BRANCH
        explicit_step = getattr(context, "step_index", None) if context is not None else None
        step = explicit_step if explicit_step is not None else self._step_from_schedule(call, name)
        state = self._branch_for_step(name, step)
        signature = self.family.input_signature(call)
        if state.signature is None:
            state.signature = signature
        elif signature != state.signature:
            self._abort(state)
            raise EngineError(
                f"Input shapes changed within a run on branch {name!r} at step {step}: the run started with "
                f"{state.signature} and this call has {signature}. Batch size and resolution must stay constant; "
                f"start a new pipeline call (or call invardiff.reset) to change them."
            )
        state.step, state.call = step, call
        self.active = state
        return state

    def end_call(self, state: BranchState, failed: bool) -> None:
        self.active = None
        state.call = None
        if failed:
            self._abort(state)

    def _branch_for_step(self, name: str, step: int) -> BranchState:
        T = self.policy.num_steps
        if T is None:
            raise EngineError(
                f"The {self.policy.name} policy does not know the run's step count: steps come from "
                f"cache_context, not from a pipeline's scheduler. Set num_inference_steps in its config."
            )
        if not 0 <= step < T:
            raise EngineError(
                f"Step index {step} on branch {name!r} is outside the plan's {T} steps; the run makes more "
                f"transformer calls than the plan has steps."
            )
        state = self.branches.get(name)
        if state is None or state.num_steps != T:  # new branch, or a policy that follows the scheduler's length
            if state is not None:
                self._abort(state)
            state = self.branches[name] = BranchState(name, T, len(self.units))
        if step == 0:
            self._restart_branch(state)
        elif state.step is None or step != state.step + 1:
            last = "no step yet" if state.step is None else f"step {state.step}"
            raise EngineError(
                f"Branch {name!r} got step {step} after {last}; the plan must run its steps in order starting at "
                f"0. Start a new pipeline call, or call invardiff.reset(...) before a new manual loop."
            )
        return state

    def _step_from_schedule(self, call: TransformerCall, name: str) -> int:
        if self.pipeline is None:
            raise EngineError(
                "The step index of this transformer call is unknown. Enable invardiff on the pipeline "
                "(invardiff.enable(pipe, plan)) so that steps come from its scheduler, or wrap each call in "
                "invardiff.cache_context(transformer, name, step_index=i)."
            )
        timesteps = getattr(self.pipeline.scheduler, "timesteps", None)
        if timesteps is None:
            raise EngineError("The pipeline's scheduler has no timesteps; was set_timesteps called?")
        if timesteps is not self._schedule:
            # set_timesteps made a new schedule: this is the start of a new pipeline call.
            values = np.asarray(timesteps.detach().float().cpu(), dtype=np.float64)
            self.policy.check_num_steps(len(values))
            self._schedule, self._schedule_values = timesteps, values
            self.reset()
        return self._match_timestep(call, name)

    def _match_timestep(self, call: TransformerCall, name: str) -> int:
        values = self._schedule_values
        timestep = call.timestep_values(self.family.timestep_scale).numpy()
        if not np.allclose(timestep, timestep[0]):
            raise EngineError(f"The samples of one call have different timesteps {timestep.tolist()}; unsupported.")
        state = self.branches.get(name)
        expected = 0 if state is None or state.step is None else state.step + 1
        distance = np.abs(values - timestep[0])
        if expected < len(values) and distance[expected] <= distance.min() + 1e-6 * max(1.0, abs(timestep[0])):
            return expected
        wanted = f"step {expected} (timestep {values[expected]:.6g})" if expected < len(values) else "no more steps"
        raise EngineError(
            f"Transformer call on branch {name!r} has timestep {timestep[0]:.6g}, but the scheduler's schedule "
            f"says {wanted}. The pipeline does not make one transformer call per scheduler step in order "
            f"(second-order scheduler, img2img strength, or a custom loop?). Pass the step explicitly with "
            f"invardiff.cache_context(transformer, name, step_index=i)."
        )

    # ----- cached tensors (called by the hooks) -----
    def store_unit(self, state: BranchState, unit: int, value) -> None:
        old = state.units[unit]
        state.units[unit] = value
        self._account(tensor_bytes(value) - tensor_bytes(old))

    def store_hidden(self, state: BranchState, value) -> None:
        old = state.hidden
        state.hidden = value
        self._account(tensor_bytes(value) - tensor_bytes(old))

    def sync_probe_bytes(self, state: BranchState) -> None:
        held = state.probe.held_bytes()
        self._account(held - state.probe.accounted_bytes)
        state.probe.accounted_bytes = held

    def note_step0_output(self, value) -> None:
        self.all_outputs_bytes += tensor_bytes(value)

    def _account(self, delta: int) -> None:
        self.cache_bytes += delta
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)

    # ----- resets -----
    def _restart_branch(self, state: BranchState) -> None:
        self._account(-state.cached_bytes())
        state.clear_tensors()
        state.step, state.signature = None, None
        state.step_status[:] = NOT_RUN
        state.unit_status[:] = NOT_RUN
        if all(other.step is None for other in self.branches.values()):
            self.peak_cache_bytes = self.cache_bytes
            self.all_outputs_bytes = 0

    def _abort(self, state: BranchState) -> None:
        # A failed call leaves half-updated caches: drop them so that only a fresh run can continue.
        self._account(-state.cached_bytes())
        state.clear_tensors()
        state.step = None

    def release(self) -> None:
        """Free every cached tensor, keeping the record of the last run for summaries."""
        for state in self.branches.values():
            self._abort(state)

    def reset(self) -> None:
        """Start over: free every cached tensor and forget the last run."""
        self.release()
        self.branches.clear()
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        self.all_outputs_bytes = 0


__all__ = ["COMPUTED", "REUSED", "NOT_RUN", "CacheEngine", "EngineError", "PlanError", "DEFAULT_BRANCH"]
