"""Measured speedup of saved frontier plans (benchmarks/frontier.py writes them under results/frontier/plans): each
plan timed against full compute in lockstep rounds on the sweep's evaluation inputs (``bench/sweep.py``'s
measurement: a warm-up run of the point, then ``--rounds`` rounds alternating with full compute, median ratio).

Writes benchmarks/results/frontier/timing-<model>[-N-steps].jsonl. Usage:
python benchmarks/frontier_timing.py --model flux-shapes PLAN.json [PLAN.json ...] [--rounds 2] [--threads 1]
    [--steps N]  (a plan of a few-step sweep: the model sampled at N steps)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from invardiff.bench.bundled import sweep_inputs, sweep_name
from invardiff.bench.points import plan_point
from invardiff.bench.sweep import count_flops, run_point
from invardiff.bench.targets import bundled_target
from invardiff.files import write_text
from invardiff.plan import CachePlan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("plans", nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    parser.add_argument("--out", default="benchmarks/results/frontier")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = bundled_target(args.model, num_inference_steps=args.steps)
    pipe = target.load()
    inputs = sweep_inputs(target, [0])
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    full = {"images": reference, "flops": full_flops}
    results = []
    for path in args.plans:
        plan = CachePlan.load(path)
        point = plan_point(Path(path).stem, plan, dict(plan.provenance.get("search", {})), method="invardiff-search")
        result = run_point(inputs, pipe, full, point, args.rounds)
        result["plan"] = path
        result["threads"] = args.threads
        results.append(result)
        keys = ("label", "ideal_speedup", "measured_speedup", "round_speedups", "psnr")
        print(json.dumps({k: result.get(k) for k in keys}))
    text = "".join(json.dumps(r) + "\n" for r in results)
    write_text(Path(args.out) / f"timing-{sweep_name(args.model, args.steps)}.jsonl", text)


if __name__ == "__main__":
    main()
