"""The diffusers hooks through which the engine executes a runtime policy on a stock transformer.

* :class:`StepHook` on the transformer: resolves step and branch, asks the policy for the step's action, and on a
  ``REUSE`` step runs only the conditioning and the output head.
* :class:`HeadInputHook` on the head's first module: hands the pre-head hidden state to the policy, which may
  replace rows (samples that skipped after a probe) and says what to keep.
* :class:`UnitHook` on each reusable submodule (``attn``, ``ff``, ...): computes, or returns the last computed
  output. Norms, modulation and gates live outside these submodules, so they are always recomputed.
* :class:`PassthroughHook` on a unit's second stage (Flux single ``act_mlp``): stores its output on compute and
  passes the reused tensor through on reuse.
* :class:`BlockHook` on each block, for policies with a probe: records the block-stack input, asks the policy to
  decide after the probe blocks, and then runs the remaining blocks on the computing samples only (their
  per-sample arguments cut the same way) or lets every block pass its inputs through when no sample computes.
  Nothing is raised through the model's forward, so other hooks on the model (offloading, context-parallel
  gathers) see an ordinary call.

This is the only place where decisions meet tensors; no policy is named here.
"""

from __future__ import annotations

import inspect

from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, StateManager

from .policy import StepAction
from .state import COMPUTED, REUSED, take_rows


STEP_HOOK = "invardiff_step"
HEAD_INPUT_HOOK = "invardiff_head_input"
UNIT_HOOK = "invardiff_unit"
PASSTHROUGH_HOOK = "invardiff_unit_passthrough"
BLOCK_HOOK = "invardiff_block"
ALL_HOOKS = (STEP_HOOK, HEAD_INPUT_HOOK, UNIT_HOOK, PASSTHROUGH_HOOK, BLOCK_HOOK)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _ContextSlot(StateManager):
    """Receives the ``CacheContext`` that diffusers pipelines set with ``transformer.cache_context(name)``."""

    def __init__(self, engine):
        super().__init__(_NoState)
        self.engine = engine

    def set_context(self, context) -> None:
        super().set_context(context)
        self.engine.set_pipeline_context(context)


class StepHook(ModelHook):
    _is_stateful = True  # so that diffusers' cache_context reaches our _ContextSlot and its resets reach us

    def __init__(self, engine):
        super().__init__()
        self.engine = engine
        self.context_slot = _ContextSlot(engine)

    def new_forward(self, module, *args, **kwargs):
        engine = self.engine
        state = engine.begin_call(args, kwargs)
        failed = True
        try:
            if state.action == StepAction.REUSE:
                hidden = engine.policy.reused_hidden(module, state)
                # run_head calls the head's first module, whose HeadInputHook asks the policy what to keep.
                output = engine.family.run_head(module, hidden, state.call)
            else:
                output = self.fn_ref.original_forward(*args, **kwargs)
            failed = False
        finally:
            engine.end_call(state, failed)
        return output

    def reset_state(self, module):
        # diffusers calls this at the end of every pipeline call (maybe_free_model_hooks): free the memory.
        self.engine.release()
        return module


class HeadInputHook(ModelHook):
    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def pre_forward(self, module, *args, **kwargs):
        engine = self.engine
        state = engine.active
        if state is None:
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, N, D) pre-head hidden state
        head_hidden, kept = engine.policy.head_input(state, hidden)
        if head_hidden is not hidden:
            args, kwargs = ((head_hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": head_hidden})
        if state.step == 0:
            engine.note_step0_output(head_hidden)
        engine.store_hidden(state, kept)
        return args, kwargs


class UnitHook(ModelHook):
    def __init__(self, engine, unit: int, stores_output: bool):
        super().__init__()
        self.engine = engine
        self.unit = unit
        self.stores_output = stores_output  # False when a PassthroughHook stores the unit's final output

    def new_forward(self, module, *args, **kwargs):
        engine = self.engine
        state = engine.active
        if state is None:  # called outside a transformer forward: not part of any run
            return self.fn_ref.original_forward(*args, **kwargs)
        step, unit = state.step, self.unit
        if state.unit_reuse[unit]:
            output = state.units[unit]
            if output is None:
                raise RuntimeError(f"invardiff: no cached output for {engine.units[unit].fqn} at step {step}.")
            if not state.unit_keep[unit]:
                engine.store_unit(state, unit, None)
            state.unit_status[step, unit] = REUSED
            return output
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.unit_status[step, unit] = COMPUTED
        if self.stores_output:
            _store_computed(engine, state, unit, output)
        return output


class PassthroughHook(ModelHook):
    def __init__(self, engine, unit: int):
        super().__init__()
        self.engine = engine
        self.unit = unit

    def new_forward(self, module, *args, **kwargs):
        state = self.engine.active
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if state.unit_reuse[self.unit]:
            return args[0]  # the UnitHook already returned the cached final output
        output = self.fn_ref.original_forward(*args, **kwargs)
        _store_computed(self.engine, state, self.unit, output)
        return output


def _store_computed(engine, state, unit: int, output) -> None:
    if state.step == 0:
        engine.note_step0_output(output)
    engine.store_unit(state, unit, engine.policy.unit_to_keep(state, unit, output))


class BlockHook(ModelHook):
    """Probe roles of one block: ``input`` (block 0), ``probe`` (block m-1), ``deep`` (blocks m...)."""

    def __init__(self, engine, block, per_sample_args: tuple[str, ...], image_output: int | None, roles: set[str]):
        super().__init__()
        self.engine = engine
        self.records_input = "input" in roles
        self.is_probe = "probe" in roles
        self.is_deep = "deep" in roles
        self.image_output = image_output  # index of the image stream in the block's output tuple, None: a tensor
        self.per_sample_args = per_sample_args
        self.passthrough = _passthrough_layout(block, image_output)
        parameters = list(inspect.signature(type(block).forward).parameters)[1:]  # without self
        names = {*per_sample_args, *(name for name, _ in self.passthrough)}
        missing = names - set(parameters)
        if missing:
            raise ValueError(f"{type(block).__name__}.forward has no argument(s) {sorted(missing)}.")
        self.positions = {name: parameters.index(name) for name in names}

    def _argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        position = self.positions[name]
        return args[position] if position < len(args) else None

    def new_forward(self, module, *args, **kwargs):
        state = self.engine.active
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.records_input:
            state.block_input = self._argument(self.passthrough[-1][0], args, kwargs)  # image tokens x
        if self.is_deep:
            if state.skip_all:  # no sample computes: the block hands its inputs on, as an identity
                return self._identity(args, kwargs)
            if state.compute_rows is not None:
                args, kwargs = self._cut(args, kwargs, state.compute_rows)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_probe:
            image = output if self.image_output is None else output[self.image_output]
            decision = self.engine.policy.decide(state, state.block_input, image)
            state.compute_rows, state.skip_all = decision.compute_rows, decision.skip_all
            if decision.compute_rows is not None:
                output = take_rows(output, decision.compute_rows)
        return output

    def _cut(self, args: tuple, kwargs: dict, rows):
        args = list(args)
        for name in self.per_sample_args:
            if name in kwargs:
                kwargs[name] = take_rows(kwargs[name], rows)
            elif self.positions[name] < len(args):
                args[self.positions[name]] = take_rows(args[self.positions[name]], rows)
        return tuple(args), kwargs

    def _identity(self, args: tuple, kwargs: dict):
        values = {name: self._argument(name, args, kwargs) for name, _ in self.passthrough}
        if len(self.passthrough) == 1:
            return next(iter(values.values()))
        output = [None] * len(self.passthrough)
        for name, index in self.passthrough:
            output[index] = values[name]
        return tuple(output)


def _passthrough_layout(block, image_output: int | None) -> list[tuple[str, int]]:
    """``[(argument, output index)]`` of what a block returns, image stream last: diffusers' block metadata where it
    has the block class, else a block that returns its ``hidden_states`` only (``image_output`` None)."""
    try:
        meta = TransformerBlockRegistry.get(type(block))
    except ValueError:
        if image_output is not None:
            raise NotImplementedError(
                f"{type(block).__name__} returns a tuple but diffusers' TransformerBlockRegistry does not describe "
                f"it, so its pass-through output is unknown; register it with TransformerBlockRegistry.register."
            ) from None
        return [("hidden_states", 0)]
    if meta.return_encoder_hidden_states_index is None:
        return [(meta.hidden_states_argument_name, 0)]
    return [
        (meta.encoder_hidden_states_argument_name, meta.return_encoder_hidden_states_index),
        (meta.hidden_states_argument_name, meta.return_hidden_states_index),
    ]
