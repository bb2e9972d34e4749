"""Attaching an engine to a transformer and removing it: which hooks go on which modules."""

from __future__ import annotations

from diffusers.hooks import HookRegistry

from ..families import FamilySpec
from .engine import CacheEngine
from .hooks import (
    ALL_HOOKS,
    BLOCK_HOOK,
    HEAD_INPUT_HOOK,
    PASSTHROUGH_HOOK,
    STEP_HOOK,
    UNIT_HOOK,
    BlockHook,
    HeadInputHook,
    PassthroughHook,
    StepHook,
    UnitHook,
)
from .state import UnitRef


def enumerate_units(transformer, family: FamilySpec) -> list[UnitRef]:
    return [
        UnitRef(spec.attr, layer, unit.name, unit.kinds)
        for spec in family.block_lists
        for layer in range(len(getattr(transformer, spec.attr)))
        for unit in spec.units
    ]


def attached_engine(transformer) -> CacheEngine | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    return hook.engine if hook is not None else None


def install_hooks(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    """Install every hook the engine's policy needs; on any failure remove what was installed and re-raise."""
    try:
        if engine.policy.uses_units:
            _install_unit_hooks(transformer, family, engine)
        if engine.policy.probe_depth is not None:
            _install_block_hooks(transformer, family, engine)
        head = transformer.get_submodule(family.head_input)
        HookRegistry.check_if_exists_or_initialize(head).register_hook(HeadInputHook(engine), HEAD_INPUT_HOOK)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(StepHook(engine), STEP_HOOK)
        registry.invalidate_child_registries_cache()
    except BaseException:
        remove_hooks(transformer)
        raise


def remove_hooks(transformer) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in ALL_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def _install_block_hooks(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    depth = engine.policy.probe_depth
    index = 0  # block position in execution order
    for spec in family.block_lists:
        for block in getattr(transformer, spec.attr):
            roles = {"input"} if index == 0 else set()
            roles |= {"probe"} if index == depth - 1 else ({"deep"} if index >= depth else set())
            hook = BlockHook(engine, block, spec.per_sample_args, spec.image_output, roles)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK)
            index += 1


def _install_unit_hooks(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    index = 0
    for spec in family.block_lists:
        for block in getattr(transformer, spec.attr):
            for unit in spec.units:
                producer = block.get_submodule(unit.module)
                hook = UnitHook(engine, index, stores_output=unit.passthrough is None)
                HookRegistry.check_if_exists_or_initialize(producer).register_hook(hook, UNIT_HOOK)
                if unit.passthrough is not None:
                    second = block.get_submodule(unit.passthrough)
                    registry = HookRegistry.check_if_exists_or_initialize(second)
                    registry.register_hook(PassthroughHook(engine, index), PASSTHROUGH_HOOK)
                index += 1
