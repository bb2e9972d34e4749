"""Throughput of data-parallel generation: the plain loop in one process against a Ray pool of 1 and 2 workers.

Every configuration generates the same items (one pipeline call per (input, seed)) into a fresh directory, with one
CPU thread per worker, so the 1-worker Ray pool and the plain loop do the same work and their ratio is the Ray
overhead (task round trips, result transfer, the driver writing PNGs and the manifest). Pool start-up (actors
loading the model) is excluded, as :class:`RunReport` times only the generation loop. The plain loop and the
1-worker pool alternate over ``--rounds`` rounds; the overhead is the median of the per-round ratios.

Usage: python benchmarks/ray_throughput.py [--model flux-shapes] [--items 16] [--rounds 3] [--steps 28]
Writes benchmarks/results/ray-throughput-MODEL.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import ray
import torch

from invardiff.files import write_text
from invardiff.models import get
from invardiff.scale import PipelineSource, run_local, work_items
from invardiff.scale.actors import Workers
from invardiff.scale.ray_pool import GenerationPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    entry = get(args.model)
    inputs = list(entry.examples)
    seeds = list(range(-(-args.items // len(inputs))))
    items = work_items(inputs, seeds)[: args.items]
    source = PipelineSource("bundled", args.model)
    torch.set_num_threads(1)  # the plain loop gets what one Ray worker gets
    ray.init(num_cpus=2, include_dashboard=False)
    local, one, two = [], [], []
    with GenerationPool(source, Workers(1), steps=args.steps) as pool:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as directory:
                local.append(run_local(source, items, directory, steps=args.steps).items_per_second)
            with tempfile.TemporaryDirectory() as directory:
                one.append(pool.run(items, directory).items_per_second)
    with GenerationPool(source, Workers(2), steps=args.steps) as pool:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as directory:
                two.append(pool.run(items, directory).items_per_second)
    ray.shutdown()
    overhead = statistics.median(loop / ray_one - 1 for loop, ray_one in zip(local, one, strict=True))
    result = {
        "model": args.model,
        "items": len(items),
        "steps": args.steps or entry.num_inference_steps,
        "rounds": args.rounds,
        "items_per_second": {
            "plain loop": statistics.median(local),
            "ray 1 worker": statistics.median(one),
            "ray 2 workers": statistics.median(two),
        },
        "per_round": {"plain loop": local, "ray 1 worker": one, "ray 2 workers": two},
        "ray_overhead_1_worker": overhead,
        "threads_per_worker": 1,
        "cpus": len(os.sched_getaffinity(0)),
        "note": "measured on a machine shared with other jobs unless stated otherwise",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"ray-throughput-{args.model}.json", json.dumps(result, indent=1) + "\n")
    rates = result["items_per_second"]
    table = [
        f"# Ray throughput, {args.model} ({result['steps']} steps, {len(items)} items, "
        f"median of {args.rounds} rounds)",
        "",
        "| run | items/s |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in rates.items()),
        "",
        f"Ray overhead at 1 worker against the plain loop: {overhead:+.1%} (median of per-round ratios).",
    ]
    write_text(out / f"ray-throughput-{args.model}.md", "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
