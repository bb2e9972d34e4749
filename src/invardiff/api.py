"""Public entry points: ``enable``, ``disable``, ``enabled``, ``reset``, ``cache_context`` and ``summary``."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from diffusers.hooks.hooks import CacheContext

from .engine import foreign
from .engine.engine import CacheEngine
from .engine.install import attached_engine, enumerate_units, install, uninstall, unwrap
from .engine.policy import build_policy
from .engine.summary import EngineSummary, summarize
from .families import resolve_family
from .plan import CachePlan
from .policies import load_builtin_policies


logger = logging.getLogger(__name__)


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
    if attached_engine(transformer) is not None:
        raise ValueError("invardiff is already enabled on this transformer; call invardiff.disable(...) first.")
    refused = foreign.refusal(transformer, "Cannot enable invardiff")
    if refused is not None:
        raise ValueError(refused)
    load_builtin_policies()
    units = enumerate_units(transformer, family)
    policy = build_policy(plan, family, transformer, units)
    engine = CacheEngine(transformer, family, policy, units, pipeline)
    install(transformer, family, engine)
    logger.info("invardiff enabled on %s (%s family): %s", type(transformer).__name__, family.name, policy.describe())


def disable(target) -> None:
    """Remove invardiff from the transformer and free its caches; the model then behaves exactly as before."""
    transformer, _ = _resolve_target(target)
    engine = _engine_or_raise(transformer)
    engine.reset()
    uninstall(transformer)
    logger.info("invardiff disabled on %s", type(transformer).__name__)


def is_enabled(target) -> bool:
    transformer, _ = _resolve_target(target)
    return attached_engine(transformer) is not None


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
    engine.push_context(CacheContext(name, step_index=step_index))
    try:
        yield
    finally:
        engine.pop_context()


def summary(target) -> EngineSummary:
    """What the current or last run computed and reused, per branch, step, layer and unit, and its cache bytes."""
    transformer, _ = _resolve_target(target)
    return summarize(_engine_or_raise(transformer))


def _resolve_target(target) -> tuple[torch.nn.Module, object | None]:
    if isinstance(target, torch.nn.Module):
        return unwrap(target), None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and hasattr(target, "scheduler"):
        return unwrap(transformer), target
    raise TypeError(
        f"Expected a diffusers pipeline (with .transformer and .scheduler) or a transformer module, "
        f"got {type(target).__name__}."
    )


def _engine_or_raise(transformer) -> CacheEngine:
    engine = attached_engine(transformer)
    if engine is None:
        raise ValueError("invardiff is not enabled on this transformer; call invardiff.enable(...) first.")
    return engine
