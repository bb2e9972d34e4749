"""The runtime policy interface: what the engine asks, per call, per unit and at the head, and nothing else.

The engine owns the run (steps, branches, cached tensors, memory accounting) and the hooks; a policy owns the
decisions. Per transformer call the engine asks :meth:`CachePolicy.begin_step` for a :class:`StepAction`:

* ``COMPUTE``: the forward runs; each reusable unit computes or reuses as :meth:`CachePolicy.unit_actions` says.
* ``REUSE``: only the conditioning and the output head run, on :meth:`CachePolicy.reused_hidden`.
* ``PROBE``: the forward runs; after the first ``probe_depth`` blocks :meth:`CachePolicy.decide` sees the
  block-stack input and the probe output and says which samples run the remaining blocks. The others pass
  through those blocks untouched (no exception unwinds the model's forward) and get their pre-head state from
  the policy at the head (:meth:`CachePolicy.head_input`).

A policy is built from a user-facing config by the builder registered for the config's type
(:func:`register_policy`); the engine never imports a policy module. Policies keep their per-branch state in
the object :meth:`CachePolicy.new_branch` returns, and report the tensors it holds through
:meth:`CachePolicy.held_bytes` so that the engine's memory accounting stays complete.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class StepAction(enum.IntEnum):
    """What one transformer call does, as :meth:`CachePolicy.begin_step` decides (public: policies return it).

    Attributes:
        COMPUTE: the forward runs; with ``uses_units`` each reusable unit computes or reuses as
            :meth:`CachePolicy.unit_actions` says, and the pre-head state goes through :meth:`CachePolicy.head_input`.
        REUSE: the blocks do not run: the family's ``run_head`` runs the conditioning and the output head on
            :meth:`CachePolicy.reused_hidden` (a step-cached step).
        PROBE: the forward runs, and after the first ``probe_depth`` blocks :meth:`CachePolicy.decide` says which
            samples run the remaining blocks (needs ``probe_depth``).
    """

    COMPUTE = 0
    REUSE = 1
    PROBE = 2


@dataclass
class ProbeDecision:
    """What :meth:`CachePolicy.decide` returns after the probe blocks.

    Attributes:
        compute_rows: indices (on the features' device) of the samples that run the remaining blocks when only
            some do; ``None`` when every sample does, or none does.
        skip_all: no sample runs the remaining blocks.
    """

    compute_rows: torch.Tensor | None = None
    skip_all: bool = False


COMPUTE_ALL = ProbeDecision()


class CachePolicy:
    """Base class of runtime policies. Subclasses override what they use; the defaults compute everything.

    What a policy may touch. It decides; the engine executes. Each method gets the branch's run state
    (``invardiff.engine.state.BranchState``), of which a policy may read ``state.step`` (this call's step, from 0),
    ``state.num_steps``, ``state.name`` (the CFG branch), ``state.call`` (the call's arguments by name,
    ``state.call["timestep"]``), ``state.action`` (this call's :class:`StepAction`), ``state.hidden`` (what
    :meth:`head_input` kept last), ``state.units[u]`` (what :meth:`unit_to_keep` kept for unit ``u``),
    ``state.unit_reuse`` / ``state.unit_keep`` (this call's unit actions) and ``state.compute_rows`` (a probe's
    rows), and may read and write ``state.policy_state``, the object :meth:`new_branch` made: that is where a policy
    keeps its own per-branch state. Everything else (the other fields of the state, the hooks, the modules' modes,
    the memory accounting) is the engine's: a policy changes it only through its return values, and tensors it keeps
    in ``policy_state`` count in the summaries only through :meth:`held_bytes`. A policy gets the transformer only
    where it must run part of it (:meth:`reused_hidden`), and must not modify it. Units are numbered in engine
    order (``invardiff.families.FamilySpec.units_of``): the ``units`` list its builder receives.

    Attributes:
        name: short name written into summaries.
        num_steps: the run's step count, or ``None`` until :meth:`start_run` learns it from a scheduler.
        uses_units: install unit adapters (layer-wise reuse); ``False`` keeps the hot path free of them.
        observes_units: hand every computed unit output to :meth:`unit_to_keep` (calibration); otherwise only the
            outputs that ``unit_actions`` keeps (and every output at step 0 and on probe steps) are handed over.
        probe_depth: install block hooks and call :meth:`decide` after this many leading blocks; ``None``: no probe.
        record_labels: for each per-step record of :meth:`records` whose values are codes, the name of each code.
    """

    name: str = "policy"
    num_steps: int | None = None
    uses_units: bool = False
    observes_units: bool = False
    probe_depth: int | None = None
    record_labels: dict[str, Sequence[str]] = {}

    # ----- run lifecycle -----
    def start_run(self, num_steps: int) -> None:
        """A pipeline call with ``num_steps`` scheduler steps starts; raise if the policy cannot run it."""
        if self.num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f"The {self.name} policy runs {self.num_steps} steps; this run has {num_steps}.")

    def steps_needed(self) -> int | None:
        """The step count this policy runs whatever the scheduler says (a plan's, a config's fixed count), or
        ``None`` when it follows the scheduler. The engine names it when an expert gets another count."""
        return None

    def new_branch(self, state) -> object | None:
        """Per-branch policy state, made at step 0 of each run of a CFG branch (``state.call`` is the call)."""
        return None

    def begin_step(self, state) -> StepAction:
        """The action of this call (``state.step``, ``state.call``, ``state.policy_state`` are set)."""
        return StepAction.COMPUTE

    # ----- units (only when ``uses_units``) -----
    def unit_actions(self, state) -> tuple[Sequence[bool], Sequence[bool]]:
        """``(reuse, keep)`` for every unit at this step: reuse its cached output; keep its output afterwards."""
        raise NotImplementedError(f"{type(self).__name__} sets uses_units but does not implement unit_actions.")

    def unit_to_keep(self, state, unit: int, output):
        """What to cache after unit ``unit`` computed ``output`` (``None``: nothing). Default: ``keep[unit]``."""
        return output if state.unit_keep[unit] else None

    def reused_unit(self, state, unit: int, cached):
        """The output of unit ``unit`` reused at this step, from what :meth:`unit_to_keep` cached. Default: as is."""
        return cached

    # ----- head -----
    def reused_hidden(self, transformer: torch.nn.Module, state) -> torch.Tensor:
        """The pre-head hidden state of a ``REUSE`` step."""
        raise NotImplementedError(f"{type(self).__name__} returned StepAction.REUSE but has no reused_hidden.")

    def head_input(self, state, hidden: torch.Tensor) -> tuple[torch.Tensor, object]:
        """``(hidden for the head, value to cache as state.hidden)`` on a forward that reached the head.

        ``hidden`` holds only the computing rows when a probe let some samples skip (``state.compute_rows``)."""
        return hidden, None

    # ----- probe (only when ``probe_depth``) -----
    def decide(self, state, block_input: torch.Tensor, probe: torch.Tensor) -> ProbeDecision:
        """After the probe blocks: ``block_input`` is x (the first block's image tokens), ``probe`` its output."""
        return COMPUTE_ALL

    # ----- bookkeeping -----
    def end_step(self, state) -> None:
        """The call finished without error."""

    def held_bytes(self, policy_state) -> int:
        """Bytes of tensors the policy keeps from one step to the next (for the engine's memory accounting)."""
        return 0

    def drop_tensors(self, policy_state) -> None:
        """Free every tensor held in ``policy_state``; its records stay for summaries."""

    def records(self, policy_state) -> dict | None:
        """Per-step, per-sample records for :func:`invardiff.summary` (arrays ``(T, B)``), or ``None``."""
        return None

    def describe(self) -> dict:
        return {"policy": self.name}


_POLICY_BUILDERS: dict[type, Callable] = {}


def register_policy(config_cls: type):
    """Register ``builder(config, family, transformer, units) -> CachePolicy`` for configs of ``config_cls``.

    ``invardiff.enable(target, config)`` then builds the policy with ``builder`` for a ``config`` of exactly that type.
    A config type has one builder: registering a second one raises ``ValueError`` (it would silently change what
    every ``enable`` with such a config runs). Another package registers its policy through the
    ``invardiff.policies`` entry point group (``invardiff.plugins``)."""

    def decorator(builder: Callable) -> Callable:
        existing = _POLICY_BUILDERS.get(config_cls)
        if existing is not None:
            raise ValueError(
                f"A policy is already registered for {config_cls.__module__}.{config_cls.__qualname__} (builder "
                f"{existing.__module__}.{existing.__qualname__}); cannot also register "
                f"{builder.__module__}.{builder.__qualname__}. Give the new policy a config class of its own."
            )
        _POLICY_BUILDERS[config_cls] = builder
        return builder

    return decorator


def registered_policies() -> dict[type, Callable]:
    """The registered config types and their builders (a copy)."""
    return dict(_POLICY_BUILDERS)


def build_policy(config, family, transformer: torch.nn.Module, units) -> CachePolicy:
    builder = _POLICY_BUILDERS.get(type(config))
    if builder is None:
        known = ", ".join(cls.__name__ for cls in _POLICY_BUILDERS)
        raise TypeError(f"Unsupported cache config {type(config).__name__}; expected a CachePlan or one of: {known}.")
    return builder(config, family, transformer, units)
