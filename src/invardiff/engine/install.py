"""Attaching an engine to a transformer and removing it: hooks at the ends of a call, adapters inside the blocks."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry

from ..families.spec import FamilySpec
from . import adapters
from .engine import CacheEngine
from .hooks import ALL_HOOKS, HEAD_INPUT_HOOK, STEP_HOOK, HeadInputHook, StepHook
from .state import UnitRef


def enumerate_units(transformer, family: FamilySpec) -> list[UnitRef]:
    """The reusable units of ``transformer`` in engine order; raises ``SpecError`` if ``family`` does not fit it."""
    return [UnitRef(spec.attr, layer, unit.name, unit.kinds) for spec, layer, unit, _ in family.units_of(transformer)]


def unwrap(transformer: torch.nn.Module) -> torch.nn.Module:
    """The module itself when ``transformer`` is a ``torch.compile`` wrapper (whole-model compile)."""
    return getattr(transformer, "_orig_mod", transformer)


def attached_engine(transformer) -> CacheEngine | None:
    registry = getattr(unwrap(transformer), "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    return hook.engine if hook is not None else None


class Pristine:
    """What the modules held before invardiff: which had a diffusers hook registry and which an instance-level
    ``forward``. :func:`uninstall` restores exactly that, so that after ``disable`` or a failed ``enable`` the
    model equals the model before (hook registries, attributes, classes, forwards); hooks that another library
    added while invardiff was on are left in place."""

    def __init__(self, transformer: torch.nn.Module):
        modules = list(transformer.modules())
        self.registries = {id(module) for module in modules if "_diffusers_hook" in vars(module)}
        self.forwards = {id(module): vars(module)["forward"] for module in modules if "forward" in vars(module)}

    def restore(self, transformer: torch.nn.Module) -> None:
        for module in transformer.modules():
            registry = vars(module).get("_diffusers_hook")
            if registry is not None and not registry.hooks and id(module) not in self.registries:
                del module._diffusers_hook
            forward = vars(module).get("forward")
            if id(module) in self.forwards and forward is None:  # adapt() dropped a leftover binding: put it back
                module.forward = self.forwards[id(module)]
            elif forward is not None and id(module) not in self.forwards and adapters.is_own_forward(module, forward):
                del module.forward  # what HookRegistry.remove_hook leaves behind: a binding of the class's forward


def install(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    """Install every hook and adapter the engine's policy needs; on any failure remove them all and re-raise,
    leaving the model as it was."""
    engine.pristine = Pristine(transformer)
    try:
        if engine.policy.uses_units:
            _adapt_units(transformer, family, engine)
        if engine.policy.probe_depth is not None or family.head_streams is not None:
            _adapt_blocks(transformer, family, engine)
        if family.head_streams is None:  # else the last block hands the packed streams over (adapters.HEAD)
            head = transformer.get_submodule(family.head_input)
            HookRegistry.check_if_exists_or_initialize(head).register_hook(HeadInputHook(engine), HEAD_INPUT_HOOK)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(StepHook(engine), STEP_HOOK)
        registry.invalidate_child_registries_cache()
    except BaseException:
        uninstall(transformer, engine.pristine)
        raise


def uninstall(transformer, pristine: Pristine | None = None) -> None:
    """Remove every invardiff hook and adapter; with ``pristine`` (the engine's), also what removing them left."""
    if pristine is None:
        engine = attached_engine(transformer)
        pristine = getattr(engine, "pristine", None)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in ALL_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    for module in transformer.modules():
        adapters.restore(module)
    if pristine is not None:
        pristine.restore(transformer)


def _adapt_units(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    modules, places = [], []
    for index, (_, _, unit, block) in enumerate(family.units_of(transformer)):  # the order of enumerate_units
        producer = block.get_submodule(unit.module)
        stores = unit.passthrough is None
        adapters.adapt(producer, "unit", adapters.UnitSlot(engine, index, True, stores))
        modules.append((producer,))
        places.append((block, (unit.module,)))
        if unit.passthrough is not None:
            second = block.get_submodule(unit.passthrough)
            adapters.adapt(second, "passthrough", adapters.UnitSlot(engine, index, False, True))
            modules[-1] += (second,)
            places[-1] = (block, (unit.module, unit.passthrough))
    engine.unit_modules, engine.unit_places = modules, places


def _adapt_blocks(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    # Probe policies adapt every block; a family with head streams adapts its last block (execution order) too, or
    # only that one, in the HEAD role.
    depth = engine.policy.probe_depth
    streams = family.head_streams
    listed = [(spec, block) for spec in family.block_lists for block in getattr(transformer, spec.attr)]
    last = len(listed) - 1
    blocks, roles = [], []
    for index, (spec, block) in enumerate(listed):  # index: the block's position in execution order
        head = streams is not None and index == last
        if depth is None and not head:
            continue
        slot = adapters.BlockSlot(
            engine, block, spec.per_sample_args, spec.image_output, index == 0, family.rows_in_place, streams
        )
        adapters.adapt(block, "block", slot)
        blocks.append(block)
        role = adapters.HEAD if head else 0
        if depth is not None:
            role |= (adapters.INPUT if index == 0 else 0) | (adapters.PROBE if index == depth - 1 else 0)
        roles.append(role)
    deep = len(blocks) if depth is None else depth  # no probe: no deep blocks
    engine.blocks, engine.block_roles = blocks, roles
    engine.deep_blocks, engine.deep_roles = blocks[deep:], roles[deep:]
