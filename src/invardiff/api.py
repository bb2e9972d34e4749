"""Public entry points: ``enable``, ``disable``, ``enabled``, ``reset``, ``cache_context`` and ``summary``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from diffusers.hooks.hooks import CacheContext

from .engine import foreign
from .engine.engine import CacheEngine
from .engine.install import attached_engine, enumerate_units, install, uninstall, unwrap
from .engine.policy import build_policy
from .engine.summary import EngineSummary, summarize
from .expert_plans import ExpertPlans
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
            A pipeline that switches transformers along the schedule (Wan2.2: ``transformer`` for high noise,
            ``transformer_2`` for low noise) takes one per transformer, ``{"transformer": plan_high,
            "transformer_2": plan_low}``; each covers the steps its transformer runs, counted from 0. An
            :class:`~invardiff.expert_plans.ExpertPlans` (what ``calibrate`` makes for such a pipeline) is such a
            mapping, checked here against the pipeline's split of its steps.

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
    experts = _experts(family, pipeline)
    if experts:
        _enable_experts(pipeline, family, experts, plan)
        return
    if isinstance(plan, Mapping):
        raise TypeError(
            f"One plan or config per transformer is for pipelines that switch transformers along the schedule; "
            f"this {type(target).__name__} runs one transformer: pass one plan or config."
        )
    _enable_one(transformer, family, plan, pipeline)


def _enable_one(transformer, family, plan, pipeline, expert=None) -> None:
    if attached_engine(transformer) is not None:
        raise ValueError("invardiff is already enabled on this transformer; call invardiff.disable(...) first.")
    refused = foreign.refusal(transformer, "Cannot enable invardiff") or foreign.offload_refusal(transformer)
    if refused is not None:
        raise ValueError(refused)
    load_builtin_policies()
    units = enumerate_units(transformer, family)
    policy = build_policy(plan, family, transformer, units)
    engine = CacheEngine(transformer, family, policy, units, pipeline, expert)
    install(transformer, family, engine)
    logger.info("invardiff enabled on %s (%s family): %s", type(transformer).__name__, family.name, policy.describe())


def _experts(family, pipeline) -> tuple:
    if pipeline is None or family.pipeline is None or family.pipeline.experts is None:
        return ()
    return family.pipeline.experts(pipeline)


def pipeline_experts(target) -> tuple:
    """The :class:`~invardiff.families.spec.Expert` transformers of a pipeline that switches transformers along
    the schedule (Wan2.2: ``transformer``, then ``transformer_2``), in schedule order; ``()`` otherwise."""
    transformer, pipeline = _resolve_target(target)
    return _experts(resolve_family(transformer), pipeline)


def _enable_experts(pipeline, family, experts, plans) -> None:
    names = [expert.attr for expert in experts]
    if not isinstance(plans, Mapping) or sorted(plans) != sorted(names):
        given = sorted(plans) if isinstance(plans, Mapping) else f"one {type(plans).__name__}"
        raise ValueError(
            f"This {type(pipeline).__name__} switches transformers along the schedule ({', '.join(names)}); each "
            f"runs its own part of the steps with its own plan or policy. Pass one per transformer: "
            f"invardiff.enable(pipe, {{{', '.join(f'{name!r}: ...' for name in names)}}}) (got {given})."
        )
    if isinstance(plans, ExpertPlans):
        plans.check_pipeline(pipeline, experts)  # every expert gets its plan's steps, or nothing is enabled
    done = []
    try:
        for expert in experts:
            transformer = unwrap(getattr(pipeline, expert.attr))
            _enable_one(transformer, family, plans[expert.attr], pipeline, expert)
            done.append(transformer)
    except BaseException:
        for transformer in done:  # all or nothing
            disable(transformer)
        raise


def transformers_of(target) -> list[torch.nn.Module]:
    """The transformers of ``target`` (a pipeline or a transformer): each expert of a pipeline that has several
    (Wan2.2), else its one transformer, unwrapped from ``torch.compile``."""
    transformer, pipeline = _resolve_target(target)
    experts = _experts(resolve_family(transformer), pipeline) if pipeline is not None else ()
    return [unwrap(getattr(pipeline, e.attr)) for e in experts] if experts else [transformer]


def disable(target) -> None:
    """Remove invardiff from the transformer(s) and free the caches; the model then behaves exactly as before."""
    transformers = transformers_of(target)
    if len(transformers) > 1:
        if not any(attached_engine(t) is not None for t in transformers):
            _engine_or_raise(transformers[0])
        for transformer in transformers:
            if attached_engine(transformer) is not None:
                disable(transformer)
        return
    transformer = transformers[0]
    engine = _engine_or_raise(transformer)
    engine.reset()
    uninstall(transformer)
    logger.info("invardiff disabled on %s", type(transformer).__name__)


def is_enabled(target) -> bool:
    return any(attached_engine(transformer) is not None for transformer in transformers_of(target))


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
    for transformer in transformers_of(target):
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
    """What the current or last run computed and reused, per branch, step, layer and unit, and its cache bytes.

    A pipeline with several transformers (Wan2.2) has one summary per transformer: pass the transformer."""
    transformers = transformers_of(target)
    if len(transformers) > 1:
        raise ValueError(
            f"This {type(target).__name__} has one engine per transformer; ask for each summary, e.g. "
            f"invardiff.summary(pipe.transformer_2)."
        )
    transformer = transformers[0]
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
