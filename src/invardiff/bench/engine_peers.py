"""Peers on the engine benchmark's transformer loop: speed at comparable amounts of skipped work (Flux only).

The loop of ``invardiff bench-engine`` (random weights, no pipeline: FLUX.1-dev's real config on a GPU, its real
depth at hidden 256 on a CPU) runs full compute, the official InvarDiff books and the peers, whole runs
alternating in one process after a warm-up, on the same weights and trajectory. Random weights make an adaptive
cache's decisions arbitrary, so only speed is compared, at comparable work skipped: for every variant the measured
speedup (median of per-round ratios against full compute), the ideal speedup (FLOPs of one run under
``torch.utils.flop_counter``, as in the sweep), their ratio (efficiency: how much of the skipped work becomes wall
time) and the fraction of attention computations that ran. Each peer is run at several settings so that its
skipped work brackets the books'.

Peers, through their public APIs: diffusers FirstBlockCache, MagCache (ratios from its own calibration mode on this
loop) and TaylorSeer, with ``transformer.cache_context("cond")`` around each call as FluxPipeline does; cache-dit
DBCache F1B0 on the transformer alone (it patches the model for good, so it runs on its own copy of the weights,
and its context is refreshed before every run).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import api
from ..model_configs import MODEL_CONFIGS
from ..official import bundled_books, convert_official_book
from .block_calls import AttentionCallCounter
from .engine import BENCH_CONFIGS
from .loop import Trajectory
from .peers import mag_ratios_printed_by
from .timing import median


# Settings chosen so that each peer's skipped work reaches the books' (2.5-3.4x ideal) on random weights, where
# the first block's residual changes a lot between steps: on flux-bench FBCache and DBCache F1B0 computed every
# block up to a threshold of 0.2 and 82-86 % at 0.4; MagCache stops at 2.54x (its max_skip_steps=3) from 0.12 on.
FBCACHE_THRESHOLDS = (0.2, 0.4, 0.6, 0.8)
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.24)
TAYLORSEER_INTERVALS = (2, 3, 5)
DBCACHE_F1B0_THRESHOLDS = (0.2, 0.4, 0.6, 0.8)


@dataclass
class LoopVariant:
    """One way to run the loop. ``attach(transformer)`` enables it and returns the function that disables it;
    ``context(transformer, step)`` wraps each transformer call. Variants with a ``copy_group`` patch the model for
    good: they run on one copy of the weights per group, never on the one full compute runs on."""

    method: str
    label: str
    attach: Callable
    context: Callable = lambda transformer, step: contextlib.nullcontext()
    settings: dict = field(default_factory=dict)
    copy_group: str | None = None


def book_variant(name: str, plan) -> LoopVariant:
    def attach(transformer):
        api.enable(transformer, plan)
        return lambda: api.disable(transformer)

    return LoopVariant(
        "invardiff",
        f"InvarDiff book {name}",
        attach,
        lambda transformer, step: api.cache_context(transformer, "default", step_index=step),
        {"book": name},
    )


def _diffusers_variant(method: str, label: str, make_config: Callable, settings: dict) -> LoopVariant:
    def attach(transformer):
        transformer.enable_cache(make_config())
        return transformer.disable_cache

    return LoopVariant(method, label, attach, lambda transformer, step: transformer.cache_context("cond"), settings)


def _cache_dit_variant(threshold: float, steps: int) -> LoopVariant:
    settings = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": threshold}

    def attach(transformer):
        import cache_dit

        cache_config = cache_dit.DBCacheConfig(**settings, num_inference_steps=steps)
        if not hasattr(transformer, "_invardiff_cache_dit"):
            cache_dit.enable_cache(transformer, cache_config=cache_config)
            transformer._invardiff_cache_dit = True
        # Every run starts from a fresh context with this variant's settings: no state carried over.
        cache_dit.refresh_context(transformer, cache_config=cache_config)
        return lambda: None

    label = f"DBCache F1B0 thr={threshold:g}"
    return LoopVariant("cache-dit", label, attach, settings=settings, copy_group="cache-dit")


def calibrate_mag_ratios(stock: torch.nn.Module, config, steps: int, device: torch.device) -> list[float]:
    """MagCache's own calibration mode over one run of the loop."""
    from diffusers.hooks import MagCacheConfig

    stock.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    trajectory = Trajectory(stock, config, steps, device, context=lambda t, step: t.cache_context("cond"))
    try:
        return mag_ratios_printed_by(trajectory.run)
    finally:
        stock.disable_cache()


def peer_variants(stock: torch.nn.Module, config, steps: int, device: torch.device) -> list[LoopVariant]:
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    variants = [
        _diffusers_variant(
            "diffusers-fbcache", f"FBCache thr={t:g}", lambda t=t: FirstBlockCacheConfig(threshold=t), {"threshold": t}
        )
        for t in FBCACHE_THRESHOLDS
    ]
    ratios = calibrate_mag_ratios(stock, config, steps, device)
    variants += [
        _diffusers_variant(
            "diffusers-magcache",
            f"MagCache thr={t:g}",
            lambda t=t: MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=ratios),
            {"threshold": t},
        )
        for t in MAGCACHE_THRESHOLDS
    ]
    variants += [
        _diffusers_variant(
            "diffusers-taylorseer",
            f"TaylorSeer interval={i}",
            lambda i=i: TaylorSeerCacheConfig(cache_interval=i, taylor_factors_dtype=config.torch_dtype),
            {"cache_interval": i},
        )
        for i in TAYLORSEER_INTERVALS
    ]
    variants += [_cache_dit_variant(t, steps) for t in DBCACHE_F1B0_THRESHOLDS]
    return variants


def bench_flux_peers(
    size: str,
    books: list[str],
    device: torch.device,
    rounds: int,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Full compute, the official Flux ``books`` and the peers on one loop; one result dict per variant."""
    config = MODEL_CONFIGS[BENCH_CONFIGS[size]["flux"]]
    plans = {name: convert_official_book(bundled_books()[name], "flux") for name in books}
    steps = next(iter(plans.values())).num_inference_steps
    stock = config.build_transformer(device)
    variants = [book_variant(name, plan) for name, plan in plans.items()] + peer_variants(stock, config, steps, device)
    return run_variants(stock, config, variants, steps, device, rounds, progress)


def run_variants(stock, config, variants: list[LoopVariant], steps: int, device, rounds: int, progress=None):
    """Whole runs of full compute and every variant, alternating (order rotated every round) after a warm-up."""
    full = LoopVariant("full", "full compute", lambda transformer: lambda: None)
    everything = [full, *variants]
    groups = {v.copy_group: copy.deepcopy(stock) for v in everything if v.copy_group is not None}
    trajectories = {
        v.label: Trajectory(groups.get(v.copy_group, stock), config, steps, device, context=v.context)
        for v in everything
    }

    @contextlib.contextmanager
    def attached(variant: LoopVariant):
        trajectory = trajectories[variant.label]
        detach = variant.attach(trajectory.transformer)
        try:
            yield trajectory
        finally:
            detach()

    def count(variant: LoopVariant) -> tuple[int, float]:
        """FLOPs and attention fraction of one run (a run outside the timed rounds)."""
        with attached(variant) as trajectory, AttentionCallCounter(trajectory.transformer) as counter:
            with FlopCounterMode(display=False) as flops:
                trajectory.run()
        return flops.get_total_flops(), counter.fraction

    def timed_run(variant: LoopVariant) -> float:
        with attached(variant) as trajectory:
            trajectory.run()
        return trajectory.seconds

    counted = {v.label: count(v) for v in everything}
    seconds: dict[str, list[float]] = {v.label: [] for v in everything}
    for round_index in range(rounds + 1):  # round 0 is the warm-up
        shift = round_index % len(everything)
        for variant in everything[shift:] + everything[:shift]:
            elapsed = timed_run(variant)
            if round_index > 0:
                seconds[variant.label].append(elapsed)
        if progress is not None:
            progress(f"{config.name}: round {round_index}/{rounds}" + (" (warm-up)" if round_index == 0 else ""))
    full_flops = counted[full.label][0]
    results = []
    for variant in variants:
        ratios = [s / v for s, v in zip(seconds[full.label], seconds[variant.label], strict=True)]
        measured, ideal = median(ratios), full_flops / counted[variant.label][0]
        results.append(
            {
                "method": variant.method,
                "label": variant.label,
                "settings": variant.settings,
                "model_config": config.name,
                "dtype": config.dtype,
                "device": str(device),
                "num_steps": steps,
                "rounds": rounds,
                "measured_speedup": measured,
                "ideal_speedup": ideal,
                "efficiency": measured / ideal,
                "attention_computed": counted[variant.label][1],
                "median_seconds": {
                    "full": median(seconds[full.label]),
                    "variant": median(seconds[variant.label]),
                },
            }
        )
    return results


def peers_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"Books and peers on the engine loop ({meta['date']}, torch {meta['torch']}, {meta['cuda_device'] or 'CPU'}, "
        f"{meta['threads']} threads; random weights: speed only). Whole runs alternating with full compute after a "
        "warm-up; medians of per-round ratios; ideal = FLOP ratio of one run; sorted by ideal speedup.",
        "",
        "| variant | model config | measured speedup | ideal speedup | efficiency | attention computed | full s "
        "| variant s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["ideal_speedup"]):
        seconds = r["median_seconds"]
        lines.append(
            f"| {r['label']} | {r['model_config']} ({r['dtype']}) | {r['measured_speedup']:.2f}x "
            f"| {r['ideal_speedup']:.2f}x | {r['efficiency']:.3f} | {r['attention_computed']:.0%} "
            f"| {seconds['full']:.2f} | {seconds['variant']:.2f} |"
        )
    return "\n".join(lines) + "\n"
