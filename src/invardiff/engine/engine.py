"""The cache engine: resolves the step and branch of every transformer call and owns the cached tensors.

One engine is attached to one transformer by :func:`invardiff.enable`. Its hooks (``hooks.py``) call into it; a
runtime policy (``policy.py``) decides what to do. The step index of a call comes from, in this order:

1. an explicit ``step_index`` given by the caller (``invardiff.cache_context(transformer, name, step_index=i)``, or
   diffusers' ``transformer.cache_context(name, step_index=i)`` when no pipeline was passed to ``enable``);
2. the pipeline passed to ``enable``: its scheduler's timesteps, or the part of them this transformer runs when
   the pipeline switches transformers along the schedule (Wan2.2's experts: ``expert.steps``, counted from 0).
   A new ``timesteps`` tensor means a new pipeline call (``set_timesteps`` ran): all state resets, and the policy
   checks the schedule's length. Calls are counted per branch; that each call's timestep is its step's entry of
   the schedule is checked on the device and read back once, at the branch's last step (``TimestepCheck``), so
   that the check costs no host sync per call (on the CPU, where reads are free, at every call). A call that does
   not follow the schedule is an error, never drift.

The step count is always checked: from the schedule's length at the start of a pipeline call, and with explicit
step indices by the policy's own count (a step past it fails at once; a run that stops short fails when the branch
next starts at step 0, unless ``invardiff.reset`` abandoned it). Schedulers that call the transformer more than
once per step (``scheduler.order > 1``: Heun, DPM2) are refused for every policy (plan, interval, DiCache,
plan+probe, calibration recording): each counts one call per step, in its plan rows, warm-up, interval or DiCache's
residual trajectory, and would silently mean something else there.

CFG: each ``cache_context`` name (``"cond"``, ``"uncond"``) has its own state; a call without a context name uses
one ``"default"`` state, which is right for pipelines that batch the branches (DiT); a pipeline that runs the branches
as separate calls without a context (``ChromaPipeline``) has its calls named by its family
(``PipelineSpec.call_branches``).
"""

from __future__ import annotations

import bisect
import inspect
import logging

import torch

from ..families.spec import CallBinder, FamilySpec, TransformerCall
from ..plan_file import PlanError
from . import adapters, foreign
from .adapters import COMPUTE as COMPUTE_MODE
from .adapters import INACTIVE, MODE
from .adapters import PLAIN as PLAIN_MODE
from .adapters import REUSE as REUSE_MODE
from .policy import CachePolicy, StepAction
from .state import COMPUTED, NOT_RUN, REUSED, BranchState, UnitRef, take_rows, tensor_bytes


logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "default"


class EngineError(RuntimeError):
    """A run does not follow the plan (wrong step order, batch size or resolution change, ...)."""


def host_reads_are_free(device: torch.device) -> bool:
    """Reading a value of a tensor on ``device`` costs no device synchronisation (the CPU)."""
    return device.type == "cpu"


def _precision(dtype: torch.dtype) -> float:
    """The relative precision of a timestep of ``dtype`` (at least 1e-6; integers: 1e-6), TimestepCheck's ties."""
    return max(torch.finfo(dtype).eps, 1e-6) if dtype.is_floating_point else 1e-6


_PRECISION = {dtype: _precision(dtype) for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


class TimestepCheck:
    """Checks that each call's timestep is its step's entry of the scheduler's schedule, without a host sync.

    The nearest schedule entry must be the expected one, within the precision of the call's timestep: pipelines
    cast the timestep to the latents' dtype before the call (FLUX: ``t.expand(B).to(latents.dtype) / 1000``), which
    rounds it to within ``eps(dtype) / 2`` relative, twice at most (cast and division). So entries that differ by
    less than ``eps(dtype)`` relative (at least 1e-6) are ties: in bfloat16 (eps 2^-7) the shifted FLUX schedule
    has such neighbours near t = 1000 from about 70 steps on, which the former fixed 1e-6 reported as a pipeline
    that does not follow its schedule. A call one step off is still caught wherever its dtype can tell the two
    steps apart.

    On an accelerator, mismatches are folded into one small device tensor and :meth:`verify` reads it back (one
    host sync) and raises on the first bad call. On the CPU, where reading a value is free, every call is checked
    at once on host floats: a dozen small tensor ops per call cost more than the check itself (~0.13 ms against
    ~0.01 ms, which a small model's 25 ms call notices).
    """

    def __init__(self, timesteps: torch.Tensor, scale: float, offset: float = 0.0):
        self.values = timesteps.detach().float()  # on the scheduler's device; never read on the host per call
        self.scale, self.offset = scale, offset  # schedule entry = offset + scale * the call's timestep
        self.host_values = self.values.tolist() if host_reads_are_free(self.values.device) else None
        self.host_sorted = sorted(self.host_values) if self.host_values is not None else None  # nearest by bisection
        self.first_bad: torch.Tensor | None = None  # (3,): [bad, step, timestep] of the first bad call
        self.pending = False

    def add(self, timestep, step: int, branch: str) -> None:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([float(timestep)], dtype=torch.float64)
        precision = _PRECISION.get(timestep.dtype) or _precision(timestep.dtype)  # the table: no finfo per call
        if self.host_values is not None and host_reads_are_free(timestep.device):
            self._check_on_host(timestep, step, precision, branch)
            return
        t = timestep.detach().float().reshape(-1).to(self.values.device) * self.scale + self.offset  # (B,)
        distance = (self.values - t[0]).abs()
        tolerance = precision * t[0].abs().clamp_min(1.0)
        bad = (distance[step] > distance.min() + tolerance) | (t != t[0]).any()
        record = torch.stack([bad.float(), torch.full((), float(step), device=t.device), t[0]])
        self.first_bad = (
            record if self.first_bad is None else torch.where(self.first_bad[0] > 0, self.first_bad, record)
        )
        self.pending = True

    def _check_on_host(self, timestep: torch.Tensor, step: int, precision: float, branch: str) -> None:
        # The device path's test in double precision on the call's exact values (one read, no tensor op: five small
        # ops cost ~40 us a call): the two differ by float32 rounding (~6e-8 relative), far inside the tolerance (at
        # least 1e-6 relative).
        values = timestep.tolist() if timestep.ndim == 1 else timestep.reshape(-1).tolist()
        t = [value * self.scale + self.offset for value in values]
        first = t[0]
        entries = self.host_sorted  # the nearest entry's distance: one of the two sorted entries around first
        index = bisect.bisect_left(entries, first)
        below, above = entries[max(index - 1, 0)], entries[min(index, len(entries) - 1)]
        nearest = min(abs(below - first), abs(above - first))
        own = abs(self.host_values[step] - first)
        if own > nearest + precision * max(abs(first), 1.0) or any(x != first for x in t):
            self._abort(branch, step, first)

    def verify(self, branch: str) -> None:
        if not self.pending:
            return
        self.pending = False
        bad, step, timestep = self.first_bad.tolist()  # the one host sync of the run
        self.first_bad = None
        if bad:
            self._abort(branch, int(step), timestep)

    def _abort(self, branch: str, step: int, timestep: float) -> None:
        wanted = f"step {step} (timestep {self.values[step].item():.6g})" if step < len(self.values) else "no step"
        raise EngineError(
            f"Transformer call on branch {branch!r} has timestep {timestep:.6g}, but the scheduler's schedule says "
            f"{wanted}. The pipeline does not make one transformer call per scheduler step in order (second-order "
            f"scheduler, img2img strength, different timesteps within one batch, or a custom loop?). Pass the step "
            f"explicitly with invardiff.cache_context(transformer, name, step_index=i)."
        )


def _refuse_multi_call_scheduler(scheduler, policy: str) -> None:
    # Every policy counts one transformer call per scheduler step: a plan's rows, warm-up and last steps, the
    # interval, DiCache's residual trajectory. A second-order scheduler (Heun, DPM2) calls the transformer twice per
    # step at two different timesteps (its timesteps list has 2T - 1 entries), so no policy's step index is meaningful.
    order = getattr(scheduler, "order", 1)
    if order != 1:
        raise EngineError(
            f"{type(scheduler).__name__} makes {order} transformer calls per denoising step; every invardiff policy "
            f"({policy} here) counts one call per step, so it cannot run under it. Use a first-order scheduler "
            f"(e.g. EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler)."
        )


class CacheEngine:
    def __init__(
        self,
        transformer,
        family: FamilySpec,
        policy: CachePolicy,
        units: list[UnitRef],
        pipeline=None,
        expert=None,
    ):
        self.family = family
        self.transformer = transformer
        self.policy = policy
        self.units = units
        self.pipeline = pipeline
        # An Expert (families.spec) when the pipeline switches transformers: expert.steps(pipeline, timesteps) is the
        # slice of the schedule this transformer runs.
        self.expert = expert
        self._steps = None  # the part of the current schedule this transformer runs
        self.binder = CallBinder(inspect.signature(transformer.forward))  # binds every call
        self.branches: dict[str, BranchState] = {}
        self.active: BranchState | None = None
        self._contexts: list = []  # invardiff.cache_context, innermost last
        self._pipeline_context = None  # what diffusers' transformer.cache_context(...) set
        self._schedule = None
        self._unnamed_calls = 0  # calls of the current pipeline call that came without a branch name
        self._checks: dict[str, TimestepCheck] = {}
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        self.all_outputs_bytes = 0  # what keeping every unit output and H of one step would take
        # Set by install: the adapted modules whose mode the engine sets around each call (adapters.py).
        self.unit_modules: list[tuple] = []  # per unit: its producer and, if any, its pass-through stage
        self.unit_places: list[tuple] = []  # per unit: (its block, the paths of those modules in the block)
        # Probe policies: every block in execution order, its static role, the deep ones and theirs; a family with
        # head streams: also (or only) its last block, in the HEAD role.
        self.blocks: list = []
        self.block_roles: list[int] = []
        self.deep_blocks: list = []
        self.deep_roles: list[int] = []
        self.pristine = None  # set by install: what uninstall restores (install.Pristine)
        # The first computed call checks that the spec's head_input is the pre-head state (hooks._check_head).
        self.head_checked = False
        self.head_hidden = None

    # ----- contexts -----
    def push_context(self, context) -> None:
        self._contexts.append(context)

    def pop_context(self) -> None:
        self._contexts.pop()

    def set_pipeline_context(self, context) -> None:
        self._pipeline_context = context

    # ----- call lifecycle (called by the step hook) -----
    def begin_call(self, args: tuple, kwargs: dict) -> BranchState:
        call = TransformerCall(self.binder, args, kwargs, self.family.latent_arg)
        context = self._contexts[-1] if self._contexts else self._pipeline_context
        # A pipeline's own step_index (WanPipeline passes one) counts the whole schedule; with the pipeline at hand
        # the schedule gives the step, checks the timestep, and knows which part of it this transformer runs.
        from_pipeline = not self._contexts and self.pipeline is not None
        name = getattr(context, "name", None)
        if name is not None and not self._contexts and self.family.pipeline is not None:  # diffusers' context
            name = self.family.pipeline.branch_names.get(name, name)
        name = name or self._unnamed_call_branch(from_pipeline)
        explicit_step = None if from_pipeline else getattr(context, "step_index", None)
        step = explicit_step if explicit_step is not None else self._step_from_schedule(call, name)
        if step == 0:  # a cache added after invardiff (transformer.enable_cache, cache-dit): refuse before it runs
            refused = foreign.refusal(self.transformer, f"At step 0 of a run on branch {name!r}")
            if refused is not None:
                raise EngineError(refused)
            self._follow_replaced_units()
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
        try:
            if step == 0:
                state.policy_state = self.policy.new_branch(state)
            state.action = self.policy.begin_step(state)
            if self.policy.uses_units:
                state.unit_reuse, state.unit_keep = self.policy.unit_actions(state)
        except BaseException:
            state.end_call()
            self._abort(state)  # the policy refused this call: the run cannot go on from here
            raise
        if state.action != StepAction.REUSE:  # a reused step runs no block: its units and blocks stay INACTIVE
            self._set_modes(state)
        self.active = state
        return state

    def _unnamed_call_branch(self, from_pipeline: bool) -> str:
        # ChromaPipeline calls the transformer once per CFG branch without diffusers' cache_context: its family names
        # the calls of a step in order (PipelineSpec.call_branches). A new schedule (a new pipeline call, or a reset)
        # starts again at the first branch.
        spec = self.family.pipeline
        if not from_pipeline or spec is None or spec.call_branches is None:
            return DEFAULT_BRANCH
        names = spec.call_branches(self.pipeline)
        if getattr(self.pipeline.scheduler, "timesteps", None) is not self._schedule:
            self._unnamed_calls = 0
        name = names[self._unnamed_calls % len(names)]
        self._unnamed_calls += 1
        return name

    def _follow_replaced_units(self) -> None:
        # A module of a unit can be replaced between runs: loading a LoRA after enable wraps a targeted Linear (Flux's
        # single-block proj_mlp is a unit on its own) in a PEFT layer that adds its low-rank term to what the adapted
        # Linear returns, and unloading it puts the bare Linear back. Either way the module now at the unit's place
        # must carry the adapter: a reused output would otherwise get a fresh LoRA term added, or be skipped.
        for index, (block, paths) in enumerate(self.unit_places):
            current = tuple(block.get_submodule(path) for path in paths)
            adapted = self.unit_modules[index]
            if all(new is old for new, old in zip(current, adapted, strict=True)):
                continue
            for kind, old, new in zip(("unit", "passthrough")[: len(current)], adapted, current, strict=True):
                if new is not old:
                    slot = old._invardiff_slot
                    adapters.restore(old)  # stock again: a wrapper that kept it as its base layer calls it plainly
                    adapters.adapt(new, kind, slot)
            self.unit_modules[index] = current
            logger.info(
                "invardiff: unit %s was replaced since enable (a LoRA loaded or unloaded?); adapted the new module",
                self.units[index].fqn,
            )

    def _set_modes(self, state: BranchState | None) -> None:
        # The adapters read their mode as a constant (one compiled graph per mode): set it around every call.
        # A computed unit calls back into the engine (a graph break under torch.compile) only when its output is
        # needed: kept for a later reuse, seen by the policy, on a probe step (a vetoed reuse refreshes the cache),
        # or at step 0 (the size of every output). Otherwise it runs PLAIN and is marked computed at the end.
        # The modes go straight into each module's __dict__: nn.Module.__setattr__ costs ~3 us per plain int, which
        # twice per call over every unit is a measurable share of a small model's call.
        if state is None:
            for modules in self.unit_modules:
                for module in modules:
                    module.__dict__[MODE] = INACTIVE
            for block in self.blocks:
                block.__dict__[MODE] = INACTIVE
            return
        every = state.step == 0 or self.policy.observes_units or state.action == StepAction.PROBE
        plain = state.plain_units = []
        for unit, (reuse, keep, modules) in enumerate(
            zip(state.unit_reuse, state.unit_keep, self.unit_modules, strict=True)
        ):
            mode = REUSE_MODE if reuse else COMPUTE_MODE if (keep or every) else PLAIN_MODE
            if mode == PLAIN_MODE:
                plain.append(unit)
            for module in modules:
                module.__dict__[MODE] = mode
        for block, role in zip(self.blocks, self.block_roles, strict=True):
            block.__dict__[MODE] = role

    def set_deep_blocks(self, mode: int) -> None:
        """After the probe's decision: how the remaining blocks run (adapters.SKIP, SUBSET or plain), each keeping
        its static role (the head block of a family with head streams: adapters.HEAD)."""
        for block, role in zip(self.deep_blocks, self.deep_roles, strict=True):
            block.__dict__[MODE] = mode | role

    def end_call(self, state: BranchState, failed: bool) -> None:
        self.active = None
        if state.action != StepAction.REUSE:
            self._set_modes(None)
        if failed:
            state.end_call()
            self._abort(state)
            return
        state.step_status[state.step] = REUSED if state.skip_all or state.action == StepAction.REUSE else COMPUTED
        if state.action == StepAction.COMPUTE:  # PLAIN units ran: a COMPUTE step runs every block
            state.unit_status[state.step, state.plain_units] = COMPUTED
        self.policy.end_step(state)
        state.end_call()
        held = self.policy.held_bytes(state.policy_state)
        self._account(held - state.policy_bytes)
        state.policy_bytes = held
        if state.step == state.num_steps - 1 and state.name in self._checks:
            self._checks[state.name].verify(state.name)

    def _branch_for_step(self, name: str, step: int) -> BranchState:
        T = self.policy.num_steps
        if T is None:
            raise EngineError(
                f"The {self.policy.name} policy does not know the run's step count: steps come from "
                f"cache_context, not from a pipeline's scheduler. Set num_inference_steps in its config."
            )
        if not 0 <= step < T:
            if name in self._checks:
                self._checks[name].verify(name)  # a schedule mismatch explains this better
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
            if state.step is not None and state.step < T - 1:
                # Only explicit step indices get here (a schedule's new run resets every branch first): a manual
                # loop that stopped early would otherwise have run a T-step plan on a shorter run without a word.
                raise EngineError(
                    f"Branch {name!r} starts a new run at step 0, but its previous run stopped after {state.step + 1} "
                    f"of the {T} steps of the {self.policy.name} policy, so it did not run as planned. Run all {T} "
                    f"steps, or call invardiff.reset(...) to abandon a run."
                )
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
            _refuse_multi_call_scheduler(self.pipeline.scheduler, self.policy.name)
            part = slice(None) if self.expert is None else self.expert.steps(self.pipeline, timesteps)
            steps = timesteps[part]
            self._start_run(steps, part, len(timesteps))
            self.reset()
            self._schedule, self._steps = timesteps, steps
        timesteps = self._steps
        state = self.branches.get(name)
        step = 0 if state is None or state.step is None else state.step + 1
        check = self._checks.get(name)
        if check is None or step == 0:
            family = self.family
            check = self._checks[name] = TimestepCheck(timesteps, family.timestep_scale, family.timestep_offset)
        if step < len(timesteps):
            check.add(call[self.family.timestep_arg], step, name)
        return step

    def _start_run(self, steps: torch.Tensor, part: slice, call_steps: int) -> None:
        try:
            self.policy.start_run(len(steps))
        except (ValueError, EngineError) as error:
            needed = self.policy.steps_needed()
            if self.expert is None or needed is None or needed == len(steps):
                raise
            # The policy's advice speaks of the whole call; an expert runs only its part of it, counted from 0.
            name, (start, stop, _) = self.expert.attr, part.indices(call_steps)
            raise type(error)(
                f"Expert {name!r} runs steps {start}-{stop - 1} ({len(steps)} steps) of this {call_steps}-step call, "
                f"but the {self.policy.name} policy of {name} is for {needed} steps: this pipeline call of "
                f"{call_steps} steps gives {name} {len(steps)} of them (the pipeline splits its steps between its "
                f"experts). Give {name} a plan or config for {len(steps)} steps (a config without "
                f"num_inference_steps follows the scheduler), or change num_inference_steps until {name} runs "
                f"{needed} steps."
            ) from error

    # ----- the pre-head state (called by the hooks and the head block's adapter) -----
    def head_state(self, state: BranchState, received: torch.Tensor) -> torch.Tensor:
        """The pre-head state the head runs on, from ``received`` (the head's input, or the packed head streams):
        the policy may replace it (rows of samples that skipped after a probe) and says what to keep."""
        hidden = received
        if self.family.rows_in_place and state.compute_rows is not None and not state.skip_all:
            hidden = take_rows(hidden, state.compute_rows)  # the deep blocks wrote the computing rows into the batch
        head_hidden, kept = self.policy.head_input(state, hidden)
        if state.step == 0:
            self.note_step0_output(head_hidden)
        if not self.head_checked:
            self.head_hidden = head_hidden  # for hooks._check_head, at the end of this call
        self.store_hidden(state, kept)
        return head_hidden

    # ----- cached tensors (called by the hooks) -----
    def store_unit(self, state: BranchState, unit: int, value) -> None:
        old = state.units[unit]
        state.units[unit] = value
        self._account(tensor_bytes(value) - tensor_bytes(old))

    def store_hidden(self, state: BranchState, value) -> None:
        old = state.hidden
        state.hidden = value
        self._account(tensor_bytes(value) - tensor_bytes(old))

    def note_step0_output(self, value) -> None:
        self.all_outputs_bytes += tensor_bytes(value)

    def _account(self, delta: int) -> None:
        self.cache_bytes += delta
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)

    # ----- resets -----
    def _clear_tensors(self, state: BranchState) -> None:
        self._account(-state.cached_bytes())
        state.hidden = None
        state.units = [None] * len(state.units)
        if state.policy_state is not None:
            self.policy.drop_tensors(state.policy_state)  # its records stay for summaries
        state.policy_bytes = 0

    def _restart_branch(self, state: BranchState) -> None:
        self._clear_tensors(state)
        state.step, state.signature = None, None
        state.step_status[:] = NOT_RUN
        state.unit_status[:] = NOT_RUN
        if all(other.step is None for other in self.branches.values()):
            self.peak_cache_bytes = self.cache_bytes
            self.all_outputs_bytes = 0

    def _abort(self, state: BranchState) -> None:
        # A failed call leaves half-updated caches: drop them so that only a fresh run can continue.
        self._clear_tensors(state)
        state.step = None
        self._checks.pop(state.name, None)

    def release(self) -> None:
        """Free every cached tensor, keeping the record of the last run for summaries."""
        for state in self.branches.values():
            self._abort(state)

    def reset(self) -> None:
        """Start over: free every cached tensor and forget the last run."""
        self.release()
        self.branches.clear()
        self._checks.clear()
        self._schedule = self._steps = None
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        self.all_outputs_bytes = 0


__all__ = ["COMPUTED", "REUSED", "NOT_RUN", "CacheEngine", "EngineError", "PlanError", "DEFAULT_BRANCH"]
