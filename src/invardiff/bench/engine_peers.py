"""Peers on the engine benchmark's transformer loop: speed at comparable amounts of skipped work (Flux only).

The loop of ``invardiff bench-engine`` (random weights, no pipeline: FLUX.1-dev's real config on a GPU, its real
depth at hidden 256 on a CPU) runs full compute, the official InvarDiff books and the peers, whole runs
alternating in one process after a warm-up (``timing.measure_rounds``), on the same weights and trajectory. Random
weights make an adaptive cache's decisions arbitrary, so only speed is compared, at comparable work skipped: for
every variant the measured speedup (median of per-round ratios against full compute), the ideal speedup (FLOPs of
one run under ``torch.utils.flop_counter``, as in the sweep), their ratio (efficiency: how much of the skipped work
becomes wall time) and the fraction of attention computations that ran. Each peer is run at several settings so
that its skipped work brackets the books'.

Peers come from the registry (``peers.py``, the loop's settings): diffusers FirstBlockCache, MagCache (ratios from
its own calibration mode on this loop) and TaylorSeer, with ``transformer.cache_context("cond")`` around each call
as FluxPipeline does; cache-dit DBCache F1B0 on the transformer alone. Every variant attaches before each of its
runs and detaches after, so all of them run on the one transformer full compute runs on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch._dynamo
from diffusers.models.cache_utils import CacheMixin
from torch._dynamo.utils import counters

from .. import api
from ..families import get_family
from ..families.model_config import ModelConfig
from ..model_configs import MODEL_CONFIGS
from . import peers
from .block_calls import AttentionCallCounter
from .engine import BENCH_CONFIGS
from .loop import Trajectory
from .plans import bench_plan
from .report import timing_warnings
from .sweep import count_flops
from .timing import Variant, measure_rounds, round_progress


@dataclass
class LoopVariant:
    """One way to run the loop. ``attach(transformer)`` enables it and returns the function that disables it,
    leaving the transformer as it found it; ``context(transformer, step)`` wraps each transformer call."""

    method: str
    label: str
    attach: Callable
    context: Callable = lambda transformer, step: contextlib.nullcontext()
    settings: dict = field(default_factory=dict)


def book_variant(name: str, plan) -> LoopVariant:
    return policy_variant("invardiff", f"InvarDiff book {name}", plan, {"book": name})


def policy_variant(method: str, label: str, policy_config, settings: dict) -> LoopVariant:
    """invardiff enabled with ``policy_config`` (a plan, a ``DiCacheConfig``...), steps given explicitly."""

    def attach(transformer):
        api.enable(transformer, policy_config)
        return lambda: api.disable(transformer)

    return LoopVariant(
        method,
        label,
        attach,
        lambda transformer, step: api.cache_context(transformer, "default", step_index=step),
        settings,
    )


def peer_variant(peer: peers.Peer) -> LoopVariant:
    return LoopVariant(
        peer.method,
        peer.label,
        lambda transformer: peer.attach(transformer, None),
        lambda transformer, step: peer.call_context(transformer),
        peer.settings,
    )


def peer_variants(
    stock: torch.nn.Module, config, steps: int, device: torch.device, settings: dict | None = None
) -> list[LoopVariant]:
    """Every peer at the loop's settings (or at ``settings``, see ``peers.peers``); MagCache's ratios from its
    calibration mode over one run of the loop, when MagCache runs."""
    ratios = None
    if settings is None or settings.get("diffusers-magcache"):
        trajectory = Trajectory(stock, config, steps, device, context=lambda t, step: t.cache_context("cond"))
        ratios = peers.calibrate_mag_ratios(stock, steps, [trajectory.run])
    return [peer_variant(peer) for peer in peers.peers(peers.LOOP, steps, ratios, settings)]


def bench_peers(
    family: str,
    size: str,
    books: list[str],
    device: torch.device,
    rounds: int,
    progress: Callable[[str | None], None] | None = None,
    *,
    config: ModelConfig | None = None,
    peer_settings: dict | None = None,
    warmup_rounds: int = 1,
) -> list[dict]:
    """Full compute, the official ``books`` of ``family`` and the peers on one loop; one result dict per variant.

    The peers are diffusers' cache hooks and cache-dit, so the family's transformer must have diffusers'
    ``CacheMixin`` (:func:`peers_can_run`). ``config`` replaces the family's benchmark config of ``size``;
    ``peer_settings`` the loop's peer settings (``peers.peers``); ``warmup_rounds``: see :func:`run_variants`."""
    config = config or MODEL_CONFIGS[BENCH_CONFIGS[size][family]]
    plans = {name: bench_plan(name, config) for name in books}
    steps = next(iter(plans.values())).num_inference_steps
    stock = config.build_transformer(device)
    variants = [book_variant(name, plan) for name, plan in plans.items()]
    variants += peer_variants(stock, config, steps, device, peer_settings)
    return run_variants(stock, config, variants, steps, device, rounds, progress, warmup_rounds=warmup_rounds)


def peers_can_run(family: str) -> bool:
    """diffusers' cache hooks need a transformer with ``CacheMixin`` (DiTTransformer2DModel has none)."""
    return issubclass(get_family(family).transformer_class, CacheMixin)


def run_variants(
    stock,
    config,
    variants: list[LoopVariant],
    steps: int,
    device,
    rounds: int,
    progress=None,
    compile_options: dict | None = None,
    warmup_rounds: int = 1,
):
    """Whole runs of full compute and every variant on ``stock``, alternating (order rotated every round) after a
    warm-up round; before that, one counted run of each (FLOPs and attention computations).

    ``compile_options``: after the counted runs (eager: FLOPs are counted on the model's own ops), ``stock`` is
    compiled with ``compile_repeated_blocks(**compile_options)``, so every variant, full compute included, is timed
    compiled (compilation happens in the warm-up round); the results then say so and count the compiled graphs.
    ``warmup_rounds``: untimed rounds first (0 only where the figures do not matter: a dry run of a script).
    """
    full = LoopVariant("full", "full compute", lambda transformer: lambda: None)
    everything = [full, *variants]
    trajectories = {v.label: Trajectory(stock, config, steps, device, context=v.context) for v in everything}
    detachers: list[Callable[[], None]] = []

    def attach(variant: LoopVariant) -> Callable[[], None]:
        return lambda: detachers.append(variant.attach(stock))

    def detach() -> None:
        detachers.pop()()

    def count(variant: LoopVariant) -> tuple[int, float]:
        """FLOPs and attention fraction of one run (a run outside the timed rounds)."""
        attach(variant)()
        try:
            with AttentionCallCounter(stock) as counter:
                flops, _ = count_flops(trajectories[variant.label].run)
        finally:
            detach()
        return flops, counter.fraction

    def whole_run(variant: LoopVariant) -> Callable[[int], float]:
        trajectory = trajectories[variant.label]
        return lambda index: (trajectory.run(), trajectory.seconds)[1]  # seconds: its transformer calls, synced

    counted = {v.label: count(v) for v in everything}
    if compile_options is not None:
        torch._dynamo.reset()
        counters.clear()
        stock.compile_repeated_blocks(**compile_options)
    times = measure_rounds(
        [Variant(v.label, whole_run(v), attach(v), detach) for v in everything],
        rounds,
        warmup_rounds=warmup_rounds,
        **round_progress(progress, config.name, rounds),
    )
    full_flops = counted[full.label][0]
    results = []
    for variant in variants:
        ideal = full_flops / counted[variant.label][0]
        speed = times.speedup(full.label, variant.label, ideal, label=f"{variant.label} on {config.name}")
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
                **speed,
                "ideal_speedup": ideal,
                "efficiency": speed["measured_speedup"] / ideal,
                "attention_computed": counted[variant.label][1],
                "compiled": _compiled_with(compile_options),
                "compiled_graphs": counters["stats"]["unique_graphs"] if compile_options is not None else None,
                "median_seconds": {
                    "full": times.median_seconds(full.label),
                    "variant": times.median_seconds(variant.label),
                },
            }
        )
    return results


def _compiled_with(options: dict | None) -> str | None:
    if options is None:
        return None
    return f"compile_repeated_blocks ({options.get('backend', 'inductor')})"


def peers_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"Books and peers on the engine loop ({meta['date']}, torch {meta['torch']}, {meta['cuda_device'] or 'CPU'}, "
        f"{meta['threads']} threads; random weights: speed only). Whole runs alternating with full compute after a "
        "warm-up; medians of per-round ratios; ideal = FLOP ratio of one run; sorted by ideal speedup.",
        "",
        "| variant | model config | measured speedup | round spread | ideal speedup | efficiency | attention computed "
        "| full s | variant s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["ideal_speedup"]):
        seconds = r["median_seconds"]
        lines.append(
            f"| {r['label']} | {r['model_config']} ({r['dtype']}) | {r['measured_speedup']:.2f}x "
            f"| {r['spread']:.0%} | {r['ideal_speedup']:.2f}x | {r['efficiency']:.3f} | {r['attention_computed']:.0%} "
            f"| {seconds['full']:.2f} | {seconds['variant']:.2f} |"
        )
    return "\n".join(lines + timing_warnings(results)) + "\n"
