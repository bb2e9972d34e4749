"""The diffusers hooks through which the engine executes a policy on a stock transformer.

* :class:`StepHook` on the transformer: resolves step and branch, and on a step-cached step runs only the
  conditioning and the output head on the cached pre-head hidden state.
* :class:`HeadInputHook` on the head's first module: keeps H when a later step will reuse it.
* :class:`UnitHook` on each reusable submodule (``attn``, ``ff``, ...): computes, or returns the last computed
  output. Norms, modulation and gates live outside these submodules, so they are always recomputed.
* :class:`PassthroughHook` on a unit's second stage (Flux single ``act_mlp``): stores its output on compute and
  passes the reused tensor through on reuse.

This is the only place where a plan meets tensors.
"""

from __future__ import annotations

from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .state import COMPUTED, REUSED, put_rows


STEP_HOOK = "invardiff_step"
HEAD_INPUT_HOOK = "invardiff_head_input"
UNIT_HOOK = "invardiff_unit"
PASSTHROUGH_HOOK = "invardiff_unit_passthrough"
ALL_HOOKS = (STEP_HOOK, HEAD_INPUT_HOOK, UNIT_HOOK, PASSTHROUGH_HOOK)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _ContextSlot(StateManager):
    """Receives the ``CacheContext`` that diffusers pipelines set with ``transformer.cache_context(name)``."""

    def __init__(self):
        super().__init__(_NoState)

    def current(self):
        return self._context


class StepHook(ModelHook):
    _is_stateful = True  # so that diffusers' cache_context reaches our _ContextSlot and its resets reach us

    def __init__(self, engine):
        super().__init__()
        self.engine = engine
        self.context_slot = _ContextSlot()
        engine.diffusers_context = self.context_slot.current

    def new_forward(self, module, *args, **kwargs):
        engine = self.engine
        state = engine.begin_call(args, kwargs)
        failed = True
        try:
            step = state.step
            if engine.probe is not None:  # DiCache or plan+probe: the probe decides inside the forward
                output = engine.probe.run_step(module, state, lambda: self.fn_ref.original_forward(*args, **kwargs))
            elif engine.policy.step_cached[step]:
                state.step_status[step] = REUSED
                hidden = state.hidden
                if engine.policy.step_reuse == "residual":  # the kept value is the residual H - x
                    hidden = engine.family.embed_input(module, state.call) + hidden
                # run_head calls the head's first module, whose HeadInputHook keeps or drops H for this step.
                output = engine.family.run_head(module, hidden, state.call)
            else:
                state.step_status[step] = COMPUTED
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
        if state is not None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, N, D) pre-head hidden state
            if engine.probe is not None:  # put back the rows of samples that skipped the deep blocks
                hidden = engine.probe.head_input(state, hidden)
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            if state.step == 0:
                engine.note_step0_output(hidden)
            if engine.observer is not None:
                engine.observer.on_hidden(state, hidden)
            engine.store_hidden(state, self._kept_value(state, hidden))
        return args, kwargs

    def _kept_value(self, state, hidden):
        policy = self.engine.policy
        if not policy.keep_hidden_after[state.step]:
            return None
        if policy.step_reuse == "state":
            return hidden
        if policy.step_cached[state.step]:
            return state.hidden  # a reused step: the residual carries on unchanged
        return hidden - self.engine.family.embed_input(self.engine.transformer, state.call)  # R = H - x


class UnitHook(ModelHook):
    def __init__(self, engine, unit: int, stores_output: bool):
        super().__init__()
        self.engine = engine
        self.unit = unit
        self.stores_output = stores_output  # False when a PassthroughHook stores the unit's final output
        self.reuse = engine.policy.unit_reuse[unit]
        self.keep_after = engine.policy.unit_keep_after[unit]

    def new_forward(self, module, *args, **kwargs):
        engine = self.engine
        state = engine.active
        if state is None:  # called outside a transformer forward: not part of any run
            return self.fn_ref.original_forward(*args, **kwargs)
        step, unit = state.step, self.unit
        if self.reuse[step]:
            output = state.units[unit]
            if output is None:
                raise RuntimeError(f"invardiff: no cached output for {engine.units[unit].fqn} at step {step}.")
            if not self.keep_after[step]:
                engine.store_unit(state, unit, None)
            state.unit_status[step, unit] = REUSED
            return output
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.unit_status[step, unit] = COMPUTED
        if self.stores_output:
            _store_computed(engine, state, unit, output, self.keep_after[step])
        return output


class PassthroughHook(ModelHook):
    def __init__(self, engine, unit: int):
        super().__init__()
        self.engine = engine
        self.unit = unit
        self.reuse = engine.policy.unit_reuse[unit]
        self.keep_after = engine.policy.unit_keep_after[unit]

    def new_forward(self, module, *args, **kwargs):
        state = self.engine.active
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        step = state.step
        if self.reuse[step]:
            return args[0]  # the UnitHook already returned the cached final output
        output = self.fn_ref.original_forward(*args, **kwargs)
        _store_computed(self.engine, state, self.unit, output, self.keep_after[step])
        return output


def _store_computed(engine, state, unit: int, output, keep: bool) -> None:
    if engine.policy.step_cached[state.step]:
        # plan+probe: the probe vetoed the plan's reuse of this step, so the unit ran (maybe on some samples
        # only). A later step may still reuse this unit's cache: refresh it, never drop it.
        cached = state.units[unit]
        if cached is not None:
            subset = state.probe.subset
            engine.store_unit(state, unit, output if subset is None else put_rows(cached, subset, output))
        return
    if state.step == 0:
        engine.note_step0_output(output)
    if engine.observer is not None:
        engine.observer.on_unit(state, unit, output)
    engine.store_unit(state, unit, output if keep else None)
