"""The diffusers hooks at the two ends of a transformer call; inside the blocks the engine acts through adapters.

* :class:`StepHook` on the transformer: resolves step and branch, asks the policy for the step's action, and on a
  ``REUSE`` step runs only the conditioning and the output head.
* :class:`HeadInputHook` on the head's first module: hands the pre-head hidden state to the policy, which may
  replace rows (samples that skipped after a probe) and says what to keep.

Units (``attn``, ``ff``, ...) and, for probe policies, blocks are driven by ``adapters.py``. Every call into the
engine is marked ``torch.compiler.disable``, so a whole-model ``torch.compile`` breaks its graph there and never
traces a decision. No policy is named here.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .policy import StepAction


STEP_HOOK = "invardiff_step"
HEAD_INPUT_HOOK = "invardiff_head_input"
ALL_HOOKS = (STEP_HOOK, HEAD_INPUT_HOOK)


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
        state = _begin_call(engine, args, kwargs)
        failed = True
        try:
            if state.action == StepAction.REUSE:
                hidden = _reused_hidden(engine, module, state)
                # run_head calls the head's first module, whose HeadInputHook asks the policy what to keep.
                output = engine.family.run_head(module, hidden, state.call)
            else:
                output = self.fn_ref.original_forward(*args, **kwargs)
            failed = False
        finally:
            _end_call(engine, state, failed)
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
        return _head_input(self.engine, args, kwargs)


@torch.compiler.disable
def _begin_call(engine, args, kwargs):
    return engine.begin_call(args, kwargs)


@torch.compiler.disable
def _end_call(engine, state, failed: bool) -> None:
    engine.end_call(state, failed)


@torch.compiler.disable
def _reused_hidden(engine, module, state):
    return engine.policy.reused_hidden(module, state)


@torch.compiler.disable
def _head_input(engine, args: tuple, kwargs: dict):
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
