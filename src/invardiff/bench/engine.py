"""Engine benchmark: stock transformer vs the engine with a reuse-nothing plan vs the engine with each book.

Two schedules, both in one process and after one warm-up run of every variant:

* ``lockstep`` (default on CPU): every variant has its own copy of the same weights and trajectory, and the
  variants take their step ``i`` one after the other (in an order rotated every step), so slow drifts of a shared
  or throttled CPU hit every variant alike;
* ``alternate`` (default on GPU, where copies of FLUX.1-dev would not fit): one transformer; whole runs alternate,
  the engine being enabled and disabled between them.

Per round each variant's time is the sum of its transformer calls. Reported, as medians over rounds of per-round
ratios: measured speedup (stock / book), overhead (reuse-nothing / stock - 1); and the ideal speedup (FLOPs,
``invardiff.stats``), the efficiency (measured / ideal), and the book's peak cache bytes against what keeping every
unit output of a step would take.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .. import api
from ..flops import profile_flops
from ..model_configs import MODEL_CONFIGS
from ..official import bundled_books, convert_official_book
from ..plan import CachePlan
from ..stats import ideal_speedup
from .loop import Trajectory
from .timing import median


# Which model config each family runs on, per benchmark size.
BENCH_CONFIGS = {
    "cpu": {"flux": "flux-bench", "dit": "dit-bench"},
    "full": {"flux": "flux1-dev", "dit": "dit-xl-2"},
    "tiny": {"flux": "flux-tiny-fulldepth", "dit": "dit-tiny-fulldepth"},  # overhead-bound: for tests only
}


def bench_family(
    family: str,
    size: str,
    books: list[str],
    device: torch.device,
    rounds: int,
    schedule: str = "lockstep",
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Benchmark the official ``books`` (names like ``"flux/fast"``) of one family; one result dict per book."""
    config = MODEL_CONFIGS[BENCH_CONFIGS[size][family]]
    plans = {name: convert_official_book(bundled_books()[name], family) for name in books}
    steps = next(iter(plans.values())).num_inference_steps
    any_plan = next(iter(plans.values()))
    variants = {"stock": None, "reuse_nothing": CachePlan.reuse_nothing(any_plan.model, steps), **plans}
    stock = config.build_transformer(device)
    if schedule == "lockstep":
        per_round, summaries = _run_lockstep(stock, config, variants, steps, device, rounds, progress)
    elif schedule == "alternate":
        per_round, summaries = _run_alternating(stock, config, variants, steps, device, rounds, progress)
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; expected 'lockstep' or 'alternate'.")

    flops = profile_flops(config)
    overhead = median([n / s for n, s in zip(per_round["reuse_nothing"], per_round["stock"], strict=True)]) - 1.0
    results = []
    for name, plan in plans.items():
        measured = median([s / b for s, b in zip(per_round["stock"], per_round[name], strict=True)])
        ideal = ideal_speedup(plan, flops)
        results.append(
            {
                "book": name,
                "source": plan.provenance["source"]["file"],
                "model_config": config.name,
                "device": str(device),
                "dtype": config.dtype,
                "schedule": schedule,
                "num_steps": steps,
                "rounds": rounds,
                "measured_speedup": measured,
                "ideal_speedup": ideal,
                "efficiency": measured / ideal,
                "overhead": overhead,
                "peak_cache_bytes": summaries[name].peak_cache_bytes,
                "all_outputs_bytes": summaries[name].all_outputs_bytes,
                "median_seconds": {v: median(per_round[v]) for v in ("stock", "reuse_nothing", name)},
                "seconds_per_round": {v: per_round[v] for v in ("stock", "reuse_nothing", name)},
            }
        )
    return results


def _run_lockstep(stock, config, variants, steps, device, rounds, progress):
    trajectories = {}
    for name, plan in variants.items():
        transformer = stock if plan is None else copy.deepcopy(stock)
        if plan is not None:
            api.enable(transformer, plan)
        trajectories[name] = Trajectory(transformer, config, steps, device)
    names = list(trajectories)
    per_round = {name: [] for name in names}
    for round_index in range(rounds + 1):  # round 0 is the warm-up
        for trajectory in trajectories.values():
            trajectory.restart()
        for step in range(steps):
            shift = (round_index * steps + step) % len(names)
            for name in names[shift:] + names[:shift]:
                trajectories[name].step(step)
        if round_index > 0:
            for name in names:
                per_round[name].append(trajectories[name].seconds)
        if progress is not None:
            progress(f"{config.name}: round {round_index}/{rounds}" + (" (warm-up)" if round_index == 0 else ""))
    summaries = {name: api.summary(t.transformer) for name, t in trajectories.items() if variants[name] is not None}
    return per_round, summaries


def _run_alternating(stock, config, variants, steps, device, rounds, progress):
    trajectory = Trajectory(stock, config, steps, device)
    names = list(variants)
    per_round = {name: [] for name in names}
    summaries = {}
    for round_index in range(rounds + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            plan = variants[name]
            if plan is not None:
                api.enable(stock, plan)
            trajectory.restart()
            for step in range(steps):
                trajectory.step(step)
            if plan is not None:
                summaries[name] = api.summary(stock)
                api.disable(stock)
            if round_index > 0:
                per_round[name].append(trajectory.seconds)
        if progress is not None:
            progress(f"{config.name}: round {round_index}/{rounds}" + (" (warm-up)" if round_index == 0 else ""))
    return per_round, summaries
