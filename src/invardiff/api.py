"""Public entry points: ``enable``, ``disable``, ``enabled``, ``reset``, ``cache_context`` and ``summary``."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import CacheContext

from .dicache.controller import ProbeController
from .dicache.hooks import PROBE_BLOCK_HOOK, ProbeBlockHook
from .engine.engine import CacheEngine
from .engine.hooks import (
    ALL_HOOKS,
    HEAD_INPUT_HOOK,
    PASSTHROUGH_HOOK,
    STEP_HOOK,
    UNIT_HOOK,
    HeadInputHook,
    PassthroughHook,
    StepHook,
    UnitHook,
)
from .engine.policy import PlanConfig, build_policy
from .engine.state import UnitRef
from .engine.summary import EngineSummary, summarize
from .families import FamilySpec, resolve_family
from .plan import CachePlan


def enable(target, plan: CachePlan | object) -> None:
    """Accelerate a diffusers pipeline or transformer by executing a cache plan (or another policy config).

    A step-cached step runs only the conditioning and the output head on the last computed pre-head hidden state;
    otherwise every attention / feed-forward unit either computes or reuses its last computed output, while norms,
    modulation and gates are always recomputed from the current timestep. The more a plan reuses, the faster and
    the further from full compute the result; a plan that reuses nothing gives bit-identical output.

    Args:
        target: a pipeline with ``transformer`` and ``scheduler`` (steps come from its scheduler, state resets at
            every pipeline call), or a bare transformer (then wrap each call in :func:`cache_context` with a
            ``step_index``).
        plan (`CachePlan`, `DiCacheConfig`, `PlanProbeConfig` or another registered policy config): what to
            execute. It is validated against the model here and against the step count at the start of every run.
            DiCache decides online per sample from a shallow probe; plan+probe lets that probe veto a plan's reuse.

    Example:
        ```python
        >>> plan = invardiff.CachePlan.load("flux-fast.json")
        >>> invardiff.enable(pipe, plan)
        >>> image = pipe("a cat", num_inference_steps=plan.num_inference_steps).images[0]
        >>> print(invardiff.summary(pipe).branches["cond"].counts())
        >>> invardiff.disable(pipe)
        ```
    """
    transformer, pipeline = _resolve_target(target)
    family = resolve_family(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(STEP_HOOK) is not None:
        raise ValueError("invardiff is already enabled on this transformer; call invardiff.disable(...) first.")
    if getattr(transformer, "is_cache_enabled", False):
        raise ValueError(
            f"A diffusers cache ({type(transformer._cache_config).__name__}) is enabled on this transformer; "
            f"call transformer.disable_cache() before enabling invardiff."
        )
    config = PlanConfig(plan) if isinstance(plan, CachePlan) else plan
    units = _enumerate_units(transformer, family)
    policy = build_policy(config, family, transformer, units)
    engine = CacheEngine(transformer, family, policy, units, pipeline)
    if getattr(policy, "full_reason", None) is not None:
        engine.probe = ProbeController(engine, policy)
    _install_hooks(transformer, family, engine)


def disable(target) -> None:
    """Remove invardiff from the transformer and free its caches; the model then behaves exactly as before."""
    transformer, _ = _resolve_target(target)
    engine = _engine_or_raise(transformer)
    engine.reset()
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in (*ALL_HOOKS, PROBE_BLOCK_HOOK):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def is_enabled(target) -> bool:
    transformer, _ = _resolve_target(target)
    return _engine(transformer) is not None


@contextmanager
def enabled(target, plan: CachePlan | object):
    """Context manager form of :func:`enable` / :func:`disable`."""
    enable(target, plan)
    try:
        yield
    finally:
        disable(target)


def reset(target) -> None:
    """Forget the current run (free every cache); the next call must be step 0."""
    transformer, _ = _resolve_target(target)
    _engine_or_raise(transformer).reset()


@contextmanager
def cache_context(target, name: str = "default", step_index: int | None = None):
    """Name the CFG branch and, for manual loops, the step index of the transformer calls made inside.

    Step 0 of a branch starts a new run for that branch.
    """
    transformer, _ = _resolve_target(target)
    engine = _engine_or_raise(transformer)
    previous = engine.explicit_context
    engine.explicit_context = CacheContext(name, step_index=step_index)
    try:
        yield
    finally:
        engine.explicit_context = previous


def summary(target) -> EngineSummary:
    """What the current or last run computed and reused, per branch, step, layer and unit, and its cache bytes."""
    transformer, _ = _resolve_target(target)
    return summarize(_engine_or_raise(transformer))


def _resolve_target(target) -> tuple[torch.nn.Module, object | None]:
    if isinstance(target, torch.nn.Module):
        return target, None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and hasattr(target, "scheduler"):
        return transformer, target
    raise TypeError(
        f"Expected a diffusers pipeline (with .transformer and .scheduler) or a transformer module, "
        f"got {type(target).__name__}."
    )


def _engine(transformer) -> CacheEngine | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_HOOK) if registry is not None else None
    return hook.engine if hook is not None else None


def _engine_or_raise(transformer) -> CacheEngine:
    engine = _engine(transformer)
    if engine is None:
        raise ValueError("invardiff is not enabled on this transformer; call invardiff.enable(...) first.")
    return engine


def _enumerate_units(transformer, family: FamilySpec) -> list[UnitRef]:
    return [
        UnitRef(spec.attr, layer, unit.name, unit.kinds)
        for spec in family.block_lists
        for layer in range(len(getattr(transformer, spec.attr)))
        for unit in spec.units
    ]


def _install_hooks(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    if engine.policy.uses_units:
        _install_unit_hooks(transformer, family, engine)
    if engine.probe is not None:
        _install_probe_hooks(transformer, family, engine)
    head = transformer.get_submodule(family.head_input)
    HookRegistry.check_if_exists_or_initialize(head).register_hook(HeadInputHook(engine), HEAD_INPUT_HOOK)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(StepHook(engine), STEP_HOOK)
    registry.invalidate_child_registries_cache()


def _install_probe_hooks(transformer, family: FamilySpec, engine: CacheEngine) -> None:
    depth = engine.policy.config.probe_depth
    index = 0  # block position in execution order
    for spec in family.block_lists:
        for block in getattr(transformer, spec.attr):
            roles = {"input"} if index == 0 else set()
            roles |= {"probe"} if index == depth - 1 else ({"deep"} if index >= depth else set())
            hook = ProbeBlockHook(engine, block, spec.image_output, spec.per_sample_args, roles)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, PROBE_BLOCK_HOOK)
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
