"""Unit and block adapters: how the engine acts inside the blocks, in a form that ``torch.compile`` can share.

Each reusable unit (``attn``, ``ff``, ...) and, for probe policies, each block gets a subclass of its own class
(same name, so ``compile_repeated_blocks`` still finds the blocks) whose ``forward`` reads one small int attribute,
``_invardiff_mode``, set by the engine before each call, and reaches the engine only through functions marked
``torch.compiler.disable``. Why not diffusers' hooks here: a hook replaces each module instance's ``forward`` with
its own ``functools.partial``, on which Dynamo guards by identity, so a regionally compiled model recompiles for
every block and hits the recompile limit. A class-level ``forward`` is the same for every block, so the compiled
graphs are shared: a block compiles one graph per distinct mode it sees, whatever the depth or the plan (the bound
is stated in :func:`graph_bound`). Decisions are never made inside a compiled region: the mode is a constant there,
and each call out to the engine is a graph break.

Modes of a unit: ``INACTIVE`` (not in a run: the stock forward), ``COMPUTE`` (compute and hand the output to the
engine), ``PLAIN`` (compute; nobody needs the output: no call out, no graph break), ``REUSE``. Modes of a block are bit
flags: ``INPUT`` (record the block-stack input x), ``PROBE`` (decide after this block), ``SKIP`` (no sample
computes: hand the inputs on), ``SUBSET`` (only some samples compute: cut their per-sample arguments), ``HEAD`` (the
last block of a family with head streams, ``FamilySpec.head_streams``: its output streams, packed into one tensor,
are the pre-head state; the policy sees it here, before the first head runs, and what it returns is unpacked into the
output, so that every head runs on the state the policy chose).
"""

from __future__ import annotations

import inspect
import types

import torch

from ..families.spec import block_outputs
from .state import COMPUTED, REUSED, put_rows, take_rows


INACTIVE, COMPUTE, REUSE, PLAIN = 0, 1, 2, 3  # unit modes
INPUT, PROBE, SKIP, SUBSET, HEAD = 1, 2, 4, 8, 16  # block mode flags
MODE = "_invardiff_mode"  # the attribute an adapted module reads its mode from
_ATTRIBUTES = (MODE, "_invardiff_slot")


class UnitSlot:
    """What a unit's adapter needs from the engine: which unit it is and whether it stores the unit's output."""

    def __init__(self, engine, unit: int, marks_status: bool, stores_output: bool):
        self.engine = engine
        self.unit = unit
        self.marks_status = marks_status  # the producer marks computed; a pass-through stage does not
        self.stores_output = stores_output  # False when a pass-through stage stores the unit's final output


class BlockSlot:
    """What a block's adapter needs for the probe: its per-sample arguments and the layout of its output."""

    def __init__(
        self,
        engine,
        block,
        per_sample_args: tuple[str, ...],
        image_output: int | None,
        first: bool,
        in_place: bool = False,
        streams=None,
    ):
        self.engine = engine
        # families.spec.HeadStreams of a family whose pre-head state is several streams: the block-stack input x
        # and the probe features are the packed streams; None: the image stream alone.
        self.streams = streams
        self.first = first  # the first block in execution order: in a run its mode is never INACTIVE
        self.image_output = image_output  # index of the image stream in the block's output tuple, None: a tensor
        self.passthrough = _passthrough_layout(block, image_output)
        # In place (FamilySpec.rows_in_place): a deep block of a subset step gets the full batch, so its streams are
        # cut too, and its output goes back into the full batch.
        self.in_place = in_place
        cut_streams = tuple(name for name, _ in self.passthrough) if in_place else ()
        self.per_sample_args = (*per_sample_args, *cut_streams)
        base = getattr(type(block), "_invardiff_base", type(block))
        parameters = list(inspect.signature(base.forward).parameters)[1:]  # without self
        names = {*per_sample_args, *(name for name, _ in self.passthrough), *(streams.arguments if streams else ())}
        missing = names - set(parameters)
        if missing:
            raise ValueError(f"{type(block).__name__}.forward has no argument(s) {sorted(missing)}.")
        self.positions = {name: parameters.index(name) for name in names}

    def argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        position = self.positions[name]
        return args[position] if position < len(args) else None


# ----- the engine side of the adapters: called out of compiled regions -----
@torch.compiler.disable
def _reused_output(module):
    slot = module._invardiff_slot
    engine, unit = slot.engine, slot.unit
    state = engine.active
    output = state.units[unit]
    if output is None:
        raise RuntimeError(f"invardiff: no cached output for {engine.units[unit].fqn} at step {state.step}.")
    if not state.unit_keep[unit]:
        engine.store_unit(state, unit, None)
    state.unit_status[state.step, unit] = REUSED
    return engine.policy.reused_unit(state, unit, output)


@torch.compiler.disable
def _computed_output(module, output) -> None:
    slot = module._invardiff_slot
    engine, unit = slot.engine, slot.unit
    state = engine.active
    if slot.marks_status:
        state.unit_status[state.step, unit] = COMPUTED
    if slot.stores_output:
        if state.step == 0:
            engine.note_step0_output(output)
        engine.store_unit(state, unit, engine.policy.unit_to_keep(state, unit, output))


@torch.compiler.disable
def _record_input(module, args: tuple, kwargs: dict) -> None:
    slot = module._invardiff_slot
    if slot.streams is not None:  # every stream, packed as the pre-head state is
        x = slot.streams.pack([slot.argument(name, args, kwargs) for name in slot.streams.arguments])
    else:
        x = slot.argument(slot.passthrough[-1][0], args, kwargs)  # image tokens x
    slot.engine.active.block_input = x


@torch.compiler.disable
def _cut_rows(module, args: tuple, kwargs: dict):
    slot = module._invardiff_slot
    rows = slot.engine.active.compute_rows
    args, kwargs = list(args), dict(kwargs)
    for name in slot.per_sample_args:
        if name in kwargs:
            kwargs[name] = take_rows(kwargs[name], rows)
        elif slot.positions[name] < len(args):
            args[slot.positions[name]] = take_rows(args[slot.positions[name]], rows)
    return tuple(args), kwargs


@torch.compiler.disable
def _identity(module, args: tuple, kwargs: dict):
    slot = module._invardiff_slot
    if len(slot.passthrough) == 1:
        return slot.argument(slot.passthrough[0][0], args, kwargs)
    output = [None] * len(slot.passthrough)
    for name, index in slot.passthrough:
        output[index] = slot.argument(name, args, kwargs)
    return tuple(output)


@torch.compiler.disable
def _after_probe(module, output):
    slot = module._invardiff_slot
    engine = slot.engine
    state = engine.active
    if slot.streams is not None:
        image = slot.streams.pack([output[index] for index in slot.streams.outputs])
    else:
        image = output if slot.image_output is None else output[slot.image_output]
    decision = engine.policy.decide(state, state.block_input, image)
    state.compute_rows, state.skip_all = decision.compute_rows, decision.skip_all
    engine.set_deep_blocks(SKIP if decision.skip_all else SUBSET if decision.compute_rows is not None else 0)
    if decision.compute_rows is None or slot.in_place:
        return output
    return take_rows(output, decision.compute_rows)


@torch.compiler.disable
def _head_output(module, output):
    streams = module._invardiff_slot.streams
    engine = module._invardiff_slot.engine
    parts = [output[index] for index in streams.outputs]
    packed = streams.pack(parts)
    head = engine.head_state(engine.active, packed)
    if head is packed:  # the policy kept the computed state: the heads run on the block's own tensors
        return output
    replaced = list(output)
    for index, part in zip(streams.outputs, streams.unpack(head, [p.shape[1:] for p in parts]), strict=True):
        replaced[index] = part
    return type(output)(replaced)


@torch.compiler.disable
def _put_back(module, full, output):
    return put_rows(full, module._invardiff_slot.engine.active.compute_rows, output)


@torch.compiler.disable
def _bypassed(module):
    raise RuntimeError(
        f"invardiff is enabled on this transformer, but its {type(module).__name__} ran outside an invardiff call: "
        f"something replaced the transformer's forward after invardiff.enable (cache-dit's enable_cache does), "
        f"so invardiff would silently not run. Remove it (cache_dit.disable_cache(pipe)), or invardiff.disable(...)."
    )


# ----- the adapter classes -----
def _unit_class(base: type) -> type:
    base_forward = base.forward

    def forward(self, *args, **kwargs):
        mode = getattr(self, "_invardiff_mode", INACTIVE)  # gone after disable: a hook added later kept this forward
        if mode == INACTIVE and getattr(self, "_invardiff_slot", None) is not None:
            _bypassed(self)
        if mode == REUSE:
            return _reused_output(self)
        output = base_forward(self, *args, **kwargs)
        if mode == COMPUTE:
            _computed_output(self, output)
        return output

    return _subclass(base, forward)


def _passthrough_class(base: type) -> type:
    base_forward = base.forward

    def forward(self, *args, **kwargs):
        mode = getattr(self, "_invardiff_mode", INACTIVE)  # gone after disable: a hook added later kept this forward
        if mode == REUSE:
            return args[0]  # the unit's producer already returned the cached final output
        output = base_forward(self, *args, **kwargs)
        if mode == COMPUTE:
            _computed_output(self, output)
        return output

    return _subclass(base, forward)


def _block_class(base: type) -> type:
    base_forward = base.forward

    def forward(self, *args, **kwargs):
        mode = getattr(self, "_invardiff_mode", INACTIVE)  # gone after disable: a hook added later kept this forward
        if mode == INACTIVE and getattr(self, "_invardiff_slot", None) is not None and self._invardiff_slot.first:
            _bypassed(self)  # in a run the first block always records the input
        if mode & SKIP:
            output = _identity(self, args, kwargs)
            return _head_output(self, output) if mode & HEAD else output
        if mode & INPUT:
            _record_input(self, args, kwargs)
        full = None
        if mode & SUBSET:
            if self._invardiff_slot.in_place:
                full = _identity(self, args, kwargs)  # the skipped rows pass through
            args, kwargs = _cut_rows(self, args, kwargs)
        output = base_forward(self, *args, **kwargs)
        if full is not None:
            output = _put_back(self, full, output)
        if mode & PROBE:
            output = _after_probe(self, output)
        if mode & HEAD:
            output = _head_output(self, output)
        return output

    return _subclass(base, forward)


_CLASSES: dict[tuple[str, type], type] = {}  # one adapter class per (kind, class): shared compiled code


def _subclass(base: type, forward) -> type:
    # Dynamo keeps its compiled variants per code object, with a recompile limit per code object: a code object
    # of its own per adapted class keeps one class's modes from using up another's limit.
    code = forward.__code__.replace(co_name=f"{base.__name__}_forward", co_qualname=f"{base.__name__}.forward")
    forward = types.FunctionType(code, forward.__globals__, code.co_name, forward.__defaults__, forward.__closure__)
    forward.__wrapped__ = base.forward  # so that inspect.signature sees the real arguments
    return type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__, "_invardiff_base": base})


def adapt(module: torch.nn.Module, kind: str, slot) -> None:
    """Give ``module`` the adapter class of ``kind`` (``unit``, ``passthrough``, ``block``), in mode INACTIVE."""
    patched = vars(module).get("forward")
    if patched is not None and is_own_forward(module, patched):
        del module.forward  # a hook library's leftover binding of the class's own forward: no behaviour of its own
    elif patched is not None:
        hooks = list(getattr(vars(module).get("_diffusers_hook"), "_hook_order", []))
        found = f"the diffusers hooks {hooks}" if hooks else "a forward patched by another library"
        raise ValueError(
            f"{type(module).__name__} at this position already carries {found}, installed before invardiff (group "
            f"offloading, layerwise casting or a cache). Enable invardiff first and install it afterwards (group "
            f"offloading works in that order), or remove it."
        )
    if hasattr(type(module), "_invardiff_base"):
        raise ValueError(f"{type(module).__name__} is already adapted by invardiff.")
    base = type(module)
    key = (kind, base)
    if key not in _CLASSES:
        make = {"unit": _unit_class, "passthrough": _passthrough_class, "block": _block_class}[kind]
        _CLASSES[key] = make(base)
    module.__class__ = _CLASSES[key]
    module._invardiff_mode = INACTIVE
    module._invardiff_slot = slot


def is_own_forward(module, forward) -> bool:
    """``forward`` is a plain binding of the module's class ``forward`` (no behaviour of its own)."""
    # diffusers' HookRegistry.remove_hook leaves ``module.forward = <bound method of the class's forward>``.
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


def restore(module: torch.nn.Module) -> None:
    """Undo :func:`adapt`: the module's own class again and no invardiff attribute."""
    base = getattr(type(module), "_invardiff_base", None)
    if base is None:
        return
    module.__class__ = base
    for name in _ATTRIBUTES:
        module.__dict__.pop(name, None)


def graph_bound(num_units_per_block: int, probe: bool, head: bool = False) -> int:
    """An upper bound on the graphs one block class compiles under ``compile_repeated_blocks`` in a run.

    Every call out to the engine is a graph break, so a block splits into one graph before its first unit and
    one after each unit. Each segment is specialised on the mode of the unit that ends it (compute, plain or reuse:
    a plain unit does not break the graph, so its segment merges with the next, which only lowers the count), and
    for a probe policy on the block's mode (plain, input, probe, input+probe, skip, subset). Shape changes (a
    subset of samples) add one dynamic-shape recompile at most. ``head``: the class of the last block of a family
    with head streams, whose hand-over of the packed streams is one more break and whose HEAD role adds three block
    modes under a probe (head, head+skip, head+subset).
    """
    segments = num_units_per_block + 1 + (1 if head else 0)
    modes = (6 + (3 if head else 0)) if probe else 1
    return segments * 3 * modes + (1 if probe else 0)


def _passthrough_layout(block, image_output: int | None) -> list[tuple[str, int]]:
    """``[(argument, output index)]`` of what a block returns, image stream last: its described outputs
    (``families.spec.block_outputs``: diffusers' block metadata, or the family's description) where there are any,
    else a block that returns its ``hidden_states`` only (``image_output`` None)."""
    base = getattr(type(block), "_invardiff_base", type(block))
    outputs = block_outputs(base)
    if outputs is None:
        if image_output is not None:
            raise NotImplementedError(
                f"{base.__name__} returns a tuple but neither diffusers' TransformerBlockRegistry nor its family "
                f"(families.spec.describe_block_outputs) describes it, so its pass-through output is unknown."
            )
        return [("hidden_states", 0)]
    if outputs.encoder_index is None or image_output is None:  # its list says the block returns one tensor
        return [(outputs.hidden_arg, 0)]
    return [(outputs.encoder_arg, outputs.encoder_index), (outputs.hidden_arg, outputs.hidden_index)]
