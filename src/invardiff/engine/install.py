"""Attaching an engine to a transformer and removing it: hooks at the ends of a call, adapters inside the blocks."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry

from ..families import FamilySpec
from . import adapters
from .engine import CacheEngine
from .hooks import ALL_HOOKS, HEAD_INPUT_HOOK, STEP_HOOK, HeadInputHook, StepHook
from .state import UnitRef


def enumerate_units(transformer, family: FamilySpec) -> list[UnitRef]:
    return [
        UnitRef(spec.attr, layer, unit.name, unit.kinds)
        for spec in family.block_lists
        for layer in range(len(getattr(transformer, spec.attr)))
        for unit in spec.units
    ]


def unwrap(transformer: torch.nn.Module) -> torch.nn.Module:
    """The module itself when ``transformer`` is a ``torch.compile`` wrapper (whole-model compile)."""
    return getattr(transformer, "_orig_mod", transformer)


def attached_engine(transformer) -> CacheEngine | None:
    registry = getattr(unwrap(transformer), "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    return hook.engine if hook is not None else None


def install(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    """Install every hook and adapter the engine's policy needs; on any failure remove them all and re-raise."""
    try:
        if engine.policy.uses_units:
            _adapt_units(transformer, family, engine)
        if engine.policy.probe_depth is not None:
            _adapt_blocks(transformer, family, engine)
        head = transformer.get_submodule(family.head_input)
        HookRegistry.check_if_exists_or_initialize(head).register_hook(HeadInputHook(engine), HEAD_INPUT_HOOK)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(StepHook(engine), STEP_HOOK)
        registry.invalidate_child_registries_cache()
    except BaseException:
        uninstall(transformer)
        raise


def uninstall(transformer) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in ALL_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    for module in transformer.modules():
        adapters.restore(module)


def _adapt_units(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    modules = []
    index = 0
    for spec in family.block_lists:
        for block in getattr(transformer, spec.attr):
            for unit in spec.units:
                producer = block.get_submodule(unit.module)
                stores = unit.passthrough is None
                adapters.adapt(producer, "unit", adapters.UnitSlot(engine, index, True, stores))
                modules.append((producer,))
                if unit.passthrough is not None:
                    second = block.get_submodule(unit.passthrough)
                    adapters.adapt(second, "passthrough", adapters.UnitSlot(engine, index, False, True))
                    modules[-1] += (second,)
                index += 1
    engine.unit_modules = modules


def _adapt_blocks(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    depth = engine.policy.probe_depth
    blocks, roles = [], []
    for spec in family.block_lists:
        for block in getattr(transformer, spec.attr):
            index = len(blocks)  # block position in execution order
            adapters.adapt(block, "block", adapters.BlockSlot(engine, block, spec.per_sample_args, spec.image_output))
            blocks.append(block)
            roles.append((adapters.INPUT if index == 0 else 0) | (adapters.PROBE if index == depth - 1 else 0))
    engine.blocks, engine.block_roles, engine.deep_blocks = blocks, roles, blocks[depth:]
