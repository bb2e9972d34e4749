"""The peer caches, each defined once, through its own public API (../shared/PEERS.md, ENVIRONMENT.md 5).

Both benchmarks that run peers take them from here: the speed-quality sweep (``invardiff bench``, on pipelines:
``points.peer_points``) and the engine loop (``invardiff bench-engine --peers``, on a bare transformer:
``engine_peers.peer_variants``). A :class:`Peer` attaches to a transformer, or to its pipeline when there is one.

* diffusers (>= 0.36) hooks via ``transformer.enable_cache``: FirstBlockCache, MagCache (ratios from its own
  ``calibrate=True`` mode, :func:`calibrate_mag_ratios`) and TaylorSeer. They need ``CacheMixin`` and a
  ``transformer.cache_context`` around each call: FluxPipeline sets it, the engine loop sets it
  (:attr:`Peer.call_context`); DiT has neither, so on DiT they cannot run and the sweep's table says why.
* cache-dit (optional ``cache-dit``): DBCache at its default (F8B0) and as F1B0 (= FBCache), on the pipeline or on
  the transformer alone. ``cache_dit.disable_cache`` restores the original forward (checked in
  ``tests/test_peers.py``), so it attaches and detaches around each run like the others and shares the baseline's
  weights.
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch


PIPELINE = "pipeline"  # the sweep: bundled trained models, or a user's saved pipeline
LOOP = "loop"  # bench-engine --peers: FLUX.1-dev's depth with random weights (model_configs flux-bench / flux1-dev)
FEW_STEP = "few-step"  # the sweep at a few steps (FEW_STEPS or fewer: invardiff bench --steps 8)
FEW_STEPS = 10  # a sweep of this many steps or fewer is a few-step sweep (bench/bundled.py says what changes)
KINDS = (PIPELINE, LOOP, FEW_STEP)

# Settings per peer and target kind. The kinds differ because the first block's residual changes differently
# between steps. On the small trained models of the sweep, the 2026-11-22 sweep had FBCache 0.05 computing every
# block (1.00x ideal) and DBCache F1B0 0.08 91 % of them, while F1B0 stopped at 1.9x ideal on flux-shapes, hence
# 0.8 at the fast end. On the loop's random weights the residual changes a lot: on flux-bench FBCache and DBCache
# F1B0 computed every block up to a threshold of 0.2 and 82-86 % at 0.4, and MagCache stops at 2.54x (its
# max_skip_steps=3) from 0.12 on; these settings make each peer's skipped work reach the books' (2.5-3.4x ideal).
# A DBCache threshold of None is cache-dit's default configuration (F8B0, threshold 0.08).
#
# An entry is the peer's main knob (threshold, TaylorSeer's interval) or a dict of its settings. The dicts are each
# peer's most aggressive settings, which reach 4-5x FLOP-ideal where the peer can (issue 27): at their defaults
# MagCache stops near 2.5x (retention_ratio 0.2 computes the first fifth, max_skip_steps 3 a step in four after
# it) and DBCache F1B0 near 2-2.8x (max_warmup_steps 8 computes the first 8). TaylorSeer caches the attention units
# only (diffusers' default patterns): the MLPs always compute, so it cannot reach 2x on these models at any interval;
# its fast end caches every unit instead.
AGGRESSIVE_MAGCACHE = (
    {"threshold": 0.5, "max_skip_steps": 6, "retention_ratio": 0.1},
    {"threshold": 1.0, "max_skip_steps": 10, "retention_ratio": 0.1},
)
# cache-dit's fastest published settings pair DBCache with its TaylorSeer calibrator (PEERS.md: DBCache(F)+TS,
# 5.7x TFLOPs on FLUX.1-dev): cached steps extrapolate the residual (first order) instead of reusing it.
AGGRESSIVE_DBCACHE_TAYLORSEER = (
    {"threshold": 0.5, "max_warmup_steps": 2, "taylorseer_order": 1},
    {"threshold": 0.8, "max_warmup_steps": 2, "taylorseer_order": 1},
)
# TaylorSeer caching the MLPs too (its paper's setting on FLUX): the attention-only default cannot reach 2x.
AGGRESSIVE_TAYLORSEER = ({"interval": 6, "all_units": True}, {"interval": 8, "all_units": True})
SETTINGS = {
    PIPELINE: {
        "diffusers-fbcache": (0.1, 0.2, 0.3, 0.5, 0.8, 1.2),
        "diffusers-magcache": (0.06, 0.12, 0.24, 0.5, *AGGRESSIVE_MAGCACHE),
        "diffusers-taylorseer": (2, 3, 5, 8, *AGGRESSIVE_TAYLORSEER),
        "cache-dit": (
            None,
            0.12,
            0.2,
            0.3,
            0.5,
            0.8,
            {"threshold": 0.5, "max_warmup_steps": 2},
            {"threshold": 0.8, "max_warmup_steps": 2},
            *AGGRESSIVE_DBCACHE_TAYLORSEER,
        ),
    },
    LOOP: {
        "diffusers-fbcache": (0.2, 0.4, 0.6, 0.8),
        "diffusers-magcache": (0.06, 0.12, 0.24),
        "diffusers-taylorseer": (2, 3, 5),
        "cache-dit": (0.2, 0.4, 0.6, 0.8),
    },
    # A few steps: the warm-ups scaled to the step count. MagCache's retention_ratio and DiCache's warmup_ratio
    # scale by themselves (0.2 of 8 steps: 2 steps); TaylorSeer keeps the 2 computed steps a first-order
    # prediction needs (not its 3) and predicts every other step (interval 2) or two in three; cache-dit's DBCache
    # warms up for 8 steps whatever the count (at 8 steps it would never cache): scaled, as at 28 steps, to
    # DBCACHE_WARMUP * steps / 28 (2 at 8 steps, 1 at 4), and 1 at the fast end. FBCache has no warm-up.
    FEW_STEP: {
        "diffusers-fbcache": (0.1, 0.2, 0.3, 0.5, 0.8),
        "diffusers-magcache": (0.06, 0.12, 0.24, {"threshold": 1.0, "max_skip_steps": 6, "retention_ratio": 0.1}),
        "diffusers-taylorseer": (
            {"interval": 2, "disable_cache_before_step": 2},
            {"interval": 3, "disable_cache_before_step": 2},
        ),
        "cache-dit": (0.12, 0.2, 0.3, 0.8, {"threshold": 0.8, "max_warmup_steps": 1}),
    },
}
METHODS = tuple(SETTINGS[PIPELINE])
DBCACHE_WARMUP = 8  # cache-dit's default max_warmup_steps


def scaled_dbcache_warmup(num_inference_steps: int) -> int:
    """cache-dit's default warm-up (8 steps, meant for 28-50) at a few-step count: the same fraction of 28 steps."""
    return max(1, round(DBCACHE_WARMUP * num_inference_steps / 28))


@dataclass(frozen=True)
class Peer:
    """One peer at one setting. ``attach(transformer, pipe)`` enables it (on ``pipe`` when given, which must own
    ``transformer``) and returns the function that disables it; ``call_context(transformer)`` is what a loop without
    a pipeline wraps each transformer call in (pipelines set their own); ``settings`` is recorded as is."""

    method: str
    label: str
    settings: dict
    attach: Callable[[torch.nn.Module, object | None], Callable[[], None]]
    call_context: Callable[[torch.nn.Module], contextlib.AbstractContextManager] = lambda t: contextlib.nullcontext()


def peers(
    kind: str, num_inference_steps: int, mag_ratios: list[float] | None = None, settings: dict | None = None
) -> list[Peer]:
    """Every peer at the settings of target ``kind`` (``"pipeline"``, ``"loop"`` or ``"few-step"``: cache-dit's
    warm-up scaled to ``num_inference_steps``), or at ``settings`` (a subset of :data:`SETTINGS`' shape: ``{method:
    settings}``, each setting a number or a dict of keyword settings; a method left out does not run).
    ``mag_ratios`` are MagCache's calibrated ratios (:func:`calibrate_mag_ratios`); without them MagCache uses
    diffusers' default (Flux) ratios."""
    if kind not in KINDS:
        raise ValueError(f"Unknown target kind {kind!r}; expected one of {KINDS}.")
    if settings is None:
        settings = SETTINGS[kind]
    unknown = sorted(set(settings) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown peer methods {unknown}; expected some of {list(METHODS)}.")
    dbcache_defaults = {"max_warmup_steps": scaled_dbcache_warmup(num_inference_steps)} if kind == FEW_STEP else {}
    makers = {
        "diffusers-fbcache": fbcache,
        "diffusers-magcache": lambda threshold, **more: magcache(threshold, num_inference_steps, mag_ratios, **more),
        "diffusers-taylorseer": taylorseer,
        "cache-dit": lambda threshold, **more: dbcache(
            threshold, num_inference_steps, **({} if threshold is None else {**dbcache_defaults, **more})
        ),
    }
    found = [
        make(**entry) if isinstance(entry, dict) else make(entry)
        for method, make in makers.items()
        for entry in settings.get(method, ())
    ]
    unique: dict[str, Peer] = {}  # one peer per label: a scaled warm-up can equal an explicit one (DBCache, 4 steps)
    for peer in found:
        unique.setdefault(peer.label, peer)
    return list(unique.values())


def fbcache(threshold: float) -> Peer:
    def config(transformer):
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=threshold)

    return _diffusers_peer("diffusers-fbcache", f"FBCache thr={threshold:g}", config, {"threshold": threshold})


def magcache(
    threshold: float,
    num_inference_steps: int,
    mag_ratios: list[float] | None,
    max_skip_steps: int = 3,
    retention_ratio: float = 0.2,
) -> Peer:
    """diffusers MagCache; ``max_skip_steps`` and ``retention_ratio`` other than diffusers' defaults (3, 0.2) are
    named in the label."""

    def config(transformer):
        from diffusers.hooks import MagCacheConfig

        ratios = mag_ratios or None  # None: diffusers' default ratios
        return MagCacheConfig(
            threshold=threshold,
            num_inference_steps=num_inference_steps,
            mag_ratios=ratios,
            max_skip_steps=max_skip_steps,
            retention_ratio=retention_ratio,
        )

    settings = {
        "threshold": threshold,
        "max_skip_steps": max_skip_steps,
        "retention_ratio": retention_ratio,
        "calibrated_ratios": len(mag_ratios or ()),
    }
    label = f"MagCache thr={threshold:g}"
    label += f" max-skip={max_skip_steps}" if max_skip_steps != 3 else ""
    label += f" retention={retention_ratio:g}" if retention_ratio != 0.2 else ""
    return _diffusers_peer("diffusers-magcache", label, config, settings)


def taylorseer(interval: int, disable_cache_before_step: int = 3, all_units: bool = False) -> Peer:
    """diffusers TaylorSeer (first order); a warm-up (``disable_cache_before_step``) other than 3 is in the label.
    It caches the family's attention units (diffusers' default), or with ``all_units`` every reusable unit of the
    family (attention and MLP, as the TaylorSeer paper caches on FLUX), named in the label."""

    def config(transformer):
        from diffusers.hooks import TaylorSeerCacheConfig

        # Taylor factors in the model's dtype: the default bfloat16 is slow on CPU and would handicap the peer
        # on the float32 models. The cached modules are the family's units: diffusers' default patterns
        # ("^blocks.*attn", fully matched) name the same modules on FLUX and HunyuanVideo but none on Wan, whose
        # attentions are blocks.N.attn1 / attn2, where TaylorSeer would silently cache nothing.
        identifiers = _unit_patterns(transformer, attention_only=not all_units)
        return TaylorSeerCacheConfig(
            cache_interval=interval,
            disable_cache_before_step=disable_cache_before_step,
            taylor_factors_dtype=transformer.dtype,
            cache_identifiers=identifiers,
        )

    settings = {"cache_interval": interval, "disable_cache_before_step": disable_cache_before_step, "max_order": 1}
    label = f"TaylorSeer interval={interval}"
    label += f" warm-up={disable_cache_before_step}" if disable_cache_before_step != 3 else ""
    if all_units:
        settings["all_units"] = True
        label += " all units"
    return _diffusers_peer("diffusers-taylorseer", label, config, settings)


def dbcache(
    threshold: float | None, num_inference_steps: int, max_warmup_steps: int | None = None, taylorseer_order: int = 0
) -> Peer:
    """cache-dit DBCache: its default (F8B0 thr=0.08) when ``threshold`` is None, else F1B0 at ``threshold``;
    ``max_warmup_steps`` (default: cache-dit's 8) is named in the label when given. ``taylorseer_order`` > 0 adds
    cache-dit's TaylorSeer calibrator of that order (cached steps extrapolate the cached residual instead of reusing
    it: cache-dit's own recipe for its fastest settings, DBCache + TaylorSeer), named in the label."""
    if threshold is None:
        if max_warmup_steps is not None or taylorseer_order:
            raise ValueError("DBCache's default configuration (threshold None) keeps its own warm-up and calibrator.")
        label, settings = "DBCache default (F8B0 thr=0.08)", {}
    else:
        label = f"DBCache F1B0 thr={threshold:g}"
        settings = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": threshold}
        if max_warmup_steps is not None:
            label += f" warm-up={max_warmup_steps}"
            settings["max_warmup_steps"] = max_warmup_steps
    if taylorseer_order < 0:
        raise ValueError(f"taylorseer_order must be 0 (no calibrator) or a positive order, got {taylorseer_order}.")
    if taylorseer_order:
        label += f" +TaylorSeer order={taylorseer_order}"
    recorded = {**settings, "taylorseer_order": taylorseer_order} if taylorseer_order else settings

    def attach(transformer, pipe=None):
        import cache_dit

        if pipe is None:  # the transformer alone: it has no pipeline to tell it the step count
            target, config = transformer, cache_dit.DBCacheConfig(**settings, num_inference_steps=num_inference_steps)
        else:
            target, config = _cache_dit_target(pipe), cache_dit.DBCacheConfig(**settings)
        calibrator = (
            cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None
        )
        order = list(transformer._modules)
        cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)

        def detach() -> None:
            cache_dit.disable_cache(pipe if pipe is not None else transformer)
            # cache-dit swaps the block lists in with unittest.mock.patch.object on every call, which re-registers
            # them last among the transformer's children; diffusers' FirstBlockCache takes the first block of the
            # first list in that order as its head block, so a later FBCache run would fail. Restore the order.
            transformer._modules = {name: transformer._modules[name] for name in order} | transformer._modules

        return detach

    return Peer("cache-dit", label, recorded, attach)


def _cache_dit_target(pipe):
    import cache_dit

    if type(pipe).__name__ in ("FluxPipeline", "DiTPipeline") or not hasattr(
        pipe.transformer, "single_transformer_blocks"
    ):
        return pipe
    # A FluxPipeline subclass (flux-shapes): cache-dit wants an explicit BlockAdapter, built here exactly as its
    # own Flux adapter does (both block lists, ForwardPattern.Pattern_1).
    return cache_dit.BlockAdapter(
        pipe=pipe,
        transformer=pipe.transformer,
        blocks=[pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks],
        forward_pattern=[cache_dit.ForwardPattern.Pattern_1, cache_dit.ForwardPattern.Pattern_1],
        check_forward_pattern=True,
    )


def _unit_patterns(transformer, attention_only: bool = True) -> list[str]:
    """Regex patterns (full match) of the family's reusable units' modules: its attention units, or all of them."""
    from ..families import resolve_family

    family = resolve_family(transformer)
    units = [
        (spec.attr, unit.module)
        for spec in family.block_lists
        for unit in spec.units
        if "attn" in unit.name or not attention_only
    ]
    return [rf"{attr}\.\d+\.{module}" for attr, module in units]


def _diffusers_peer(method: str, label: str, make_config: Callable, settings: dict) -> Peer:
    def attach(transformer, pipe=None):
        _require_cache_mixin(transformer, pipe)
        transformer.enable_cache(make_config(transformer))
        return transformer.disable_cache

    return Peer(method, label, settings, attach, call_context=lambda transformer: transformer.cache_context("cond"))


def _require_cache_mixin(transformer, pipe=None) -> None:
    if not hasattr(transformer, "enable_cache"):
        where = f", and {type(pipe).__name__} does not set cache_context" if pipe is not None else ""
        raise TypeError(
            f"{type(transformer).__name__} has no diffusers CacheMixin (enable_cache){where}: diffusers' cache hooks "
            "cannot run on it."
        )


def calibrate_mag_ratios(transformer, num_inference_steps: int, runs: list[Callable[[], object]]) -> list[float]:
    """MagCache's own calibration mode over ``runs`` (whole sampling runs through ``transformer``, each setting
    ``cache_context`` as a pipeline does); the ratios are averaged over runs. Without ``CacheMixin``: ``[]``."""
    from diffusers.hooks import MagCacheConfig

    if not hasattr(transformer, "enable_cache"):
        return []
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    try:
        ratios = [mag_ratios_printed_by(run) for run in runs]
    finally:
        transformer.disable_cache()
    return torch.tensor(ratios).mean(0).tolist()


def mag_ratios_printed_by(run: Callable[[], object]) -> list[float]:
    """MagCache's calibration mode reports its ratios only by printing them at the end of a run: capture, parse."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run()
    line = next(ln for ln in printed.getvalue().splitlines() if ln.startswith("[") and not ln.startswith("[MagCache"))
    return ast.literal_eval(line)
