"""One thin function per ``invardiff`` subcommand: parse, call the library, print. No algorithm lives here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..official import bundled_books, convert_official_book
from ..plan import CachePlan


def inspect_plan(args) -> int:
    from ..stats import plan_summary

    plan = CachePlan.load(args.plan)
    flops = config = None
    if args.memory and not args.model_config:
        raise ValueError("--memory needs --model-config (the shapes the memory depends on).")
    if args.model_config:
        from ..flops import profile_flops
        from ..model_configs import get_model_config

        config = get_model_config(args.model_config)
        flops = profile_flops(config)
    summary = plan_summary(plan, flops)
    if args.memory:
        from ..memory import cache_memory

        summary.update(cache_memory(plan, config))
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"plan: {args.plan}")
    print(
        f"model: {plan.model.model_class} ({plan.model.family}), "
        + ", ".join(f"{b.num_layers} {b.name}" for b in plan.model.block_lists)
    )
    print(f"steps: {summary['num_steps']}, step-cached: {summary['steps_reused']} {summary['step_cached_indices']}")
    print(f"{'module kind':36} {'reused':>8} {'outside step cache':>19}  reused steps outside step cache")
    for name, stat in summary["modules"].items():
        print(
            f"{name:36} {stat['reuse_fraction']:8.1%} {stat['reuse_fraction_outside_step_cache']:19.1%}  "
            f"{stat['reused_steps_outside_step_cache']}"
        )
    if flops is not None:
        print(
            f"ideal speedup on {summary['model_config']}: {summary['ideal_speedup']:.3f}x "
            f"(FLOPs executed: {summary['compute_fraction']:.1%} of full compute)"
        )
    if args.memory:
        print(
            f"peak cache memory: {summary['peak_cache_bytes'] / 2**30:.3f} GiB (keeping every unit output and H "
            f"of a step: {summary['all_outputs_bytes'] / 2**30:.3f} GiB)"
        )
    return 0


def convert_official(args) -> int:
    plan = convert_official_book(args.book, args.family)
    plan.save(args.output)
    print(
        f"wrote {args.output}: {plan.model.model_class}, {plan.num_inference_steps} steps, "
        f"{int(plan.step_cache.sum())} step-cached"
    )
    return 0


def plot(args) -> int:
    from ..plot import plot_plan

    plot_plan(CachePlan.load(args.plan), args.output)
    print(f"wrote {args.output}")
    return 0


def bench_engine(args) -> int:
    from ..bench.engine import bench_family
    from ..bench.report import write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    schedule = args.schedule or ("alternate" if device.type == "cuda" else "lockstep")
    available = bundled_books()
    books = args.books or [name for name in available if name.split("/")[0] in args.family]
    unknown = sorted(set(books) - set(available))
    if unknown:
        raise ValueError(f"Unknown books {unknown}; available: {sorted(available)}.")
    results = []
    for family in args.family:
        family_books = [b for b in books if b.startswith(family + "/")]
        if not family_books:
            continue
        with tqdm(total=args.rounds + 1, desc=f"bench-engine {family}", disable=args.json) as bar:
            results += bench_family(
                family,
                args.config,
                family_books,
                device,
                args.rounds,
                schedule,
                progress=lambda message: (bar.set_postfix_str(message), bar.update(1)),
            )
    paths = write_results(results, Path(args.out), f"bench-engine-{args.config}-{device.type}")
    if args.json:
        print(json.dumps([_public_fields(r) for r in results], indent=1))
    else:
        print(paths["markdown"].read_text())
        print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def _public_fields(result: dict) -> dict:
    keys = (
        "book",
        "measured_speedup",
        "ideal_speedup",
        "efficiency",
        "overhead",
        "peak_cache_bytes",
        "all_outputs_bytes",
        "model_config",
        "device",
        "schedule",
        "rounds",
        "median_seconds",
    )
    return {key: result[key] for key in keys}
