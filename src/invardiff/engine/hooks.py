"""The diffusers hooks at the two ends of a transformer call; inside the blocks the engine acts through adapters.

* :class:`StepHook` on the transformer: resolves step and branch, asks the policy for the step's action, and on a
  ``REUSE`` step runs only the conditioning and the output head.
* :class:`HeadInputHook` on the head's first module: hands the pre-head hidden state to the policy, which may
  replace rows (samples that skipped after a probe) and says what to keep. A family whose pre-head state is several
  streams (``FamilySpec.head_streams``) has no such hook: its last block hands the packed streams to the policy
  (``adapters.HEAD``), and a ``REUSE`` step hands the policy's tensor over here, before the head runs.

Units (``attn``, ``ff``, ...) and, for probe policies, blocks are driven by ``adapters.py``. Every call into the
engine is marked ``torch.compiler.disable``, so a whole-model ``torch.compile`` breaks its graph there and never
traces a decision. No policy is named here.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.utils._python_dispatch import _disable_current_modes

from ..families.spec import SpecError
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
                if engine.family.head_streams is not None:
                    hidden = _head_state(engine, state, hidden)  # no head hook: the policy sees the state here
                # Otherwise run_head calls the head's first module, whose HeadInputHook asks the policy what to keep.
                output = engine.family.run_head(module, hidden, state.call)
            else:
                output = self.fn_ref.original_forward(*args, **kwargs)
                if not engine.head_checked:
                    _check_head(engine, module, state, output)
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
    received = args[0] if args else kwargs["hidden_states"]  # (B, N, D) pre-head hidden state
    head_hidden = engine.head_state(state, received)
    if head_hidden is not received:
        args, kwargs = ((head_hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": head_hidden})
    return args, kwargs


@torch.compiler.disable
def _head_state(engine, state, hidden):
    return engine.head_state(state, hidden)


@torch.compiler.disable
def _check_head(engine, transformer, state, output) -> None:
    """At the first computed call after ``enable``: ``run_head`` on what the head received must reproduce the
    transformer's output, else the spec's ``head_input`` is not the pre-head hidden state (or its ``run_head`` is not
    the model's head) and every step-cached step would return something else than the model would. One head run and
    one host read per ``enable``; later calls skip it."""
    hidden, engine.head_hidden = engine.head_hidden, None
    family = engine.family
    if hidden is None:
        where = (
            f"the module {family.head_input!r} (FamilySpec.head_input) did not run"
            if family.head_streams is None
            else "the last block (whose outputs are the head streams, FamilySpec.head_streams) did not return"
        )
        raise SpecError(
            "head-input-state",
            f"family {family.name!r}: {where} in a forward of {type(transformer).__name__}, so it is not where the "
            f"pre-head hidden state enters the head.",
        )
    if hidden.device.type == "meta":  # shapes only (memory estimates): there are no values to compare
        engine.head_checked = True
        return
    active, engine.active = engine.active, None  # the head's own hook must not hand this run to the policy
    try:
        # Outside every dispatch mode: the check is the engine's bookkeeping, not the model's work, so a
        # FlopCounterMode around the run (FLOP-ideal speedups, the sweep's counted warm-up) does not count it.
        with torch.no_grad(), _disable_current_modes():
            expected = _sample(family.run_head(transformer, hidden, state.call), family.head_streams is not None)
    except Exception as error:  # noqa: BLE001 - any failure of the head on this input is the finding
        expected = f"{type(error).__name__}: {error}"
    finally:
        engine.active = active
    actual = _sample(output, family.head_streams is not None)
    if not _reproduces(actual, expected):
        raise SpecError(
            "head-input-state",
            f"family {family.name!r}: run_head on the input of {family.head_input!r} does not reproduce "
            f"{type(transformer).__name__}'s output ({_difference(actual, expected)}), so FamilySpec.head_input is "
            f"not the module whose first input is the pre-head hidden state, or FamilySpec.run_head is not the "
            f"model's head. Step-cached steps would be wrong; fix the spec.",
        )
    engine.head_checked = True


def _sample(output, every_output: bool = False) -> torch.Tensor:
    if every_output and not torch.is_tensor(output):
        # A family with head streams returns one output per stream (LTX-2: video, audio): all of them are compared,
        # each flattened per sample.
        outputs = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output)
        return torch.cat([item.reshape(item.shape[0], -1) for item in outputs if torch.is_tensor(item)], dim=1)
    if not torch.is_tensor(output):
        output = output.sample if hasattr(output, "sample") else output[0]
    if isinstance(output, (list, tuple)) and output and all(torch.is_tensor(item) for item in output):
        # One tensor per sample (ZImageTransformer2DModel): compared as one batch, when the shapes allow it.
        shapes = {item.shape for item in output}
        return torch.stack(list(output)) if len(shapes) == 1 else torch.cat([item.flatten() for item in output])
    return output


def _reproduces(actual: torch.Tensor, expected) -> bool:
    if not torch.is_tensor(expected) or expected.shape != actual.shape:
        return False
    # One comparison, one host read (torch.equal first would be a second sync on an accelerator). Equal within a few
    # ulps of the output's dtype: where the forward ran other kernels than the eager head (torch.compile fuses the
    # head) the two differ in the last bits; a head fed the wrong tensor is off by the size of the output itself.
    tolerance = max(4 * torch.finfo(actual.dtype).eps, 1e-4) if actual.is_floating_point() else 0.0
    actual, expected = actual.detach().float(), expected.detach().float()
    bound = tolerance * (actual.abs().amax() + expected.abs())
    close = ((actual - expected).abs() <= bound) | (actual.isnan() & expected.isnan())
    return bool(close.all())  # the one host read of the check


def _difference(actual: torch.Tensor, expected) -> str:
    if isinstance(expected, str):
        return f"run_head raised {expected:.200}"
    if not torch.is_tensor(expected) or expected.shape != actual.shape:
        shape = tuple(expected.shape) if torch.is_tensor(expected) else type(expected).__name__
        return f"output shape {tuple(actual.shape)}, run_head gives {shape}"
    difference = (actual.float() - expected.float()).abs().amax().item()
    return f"largest difference {difference:.3g} against outputs up to {actual.float().abs().amax().item():.3g}"
