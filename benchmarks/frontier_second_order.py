"""Second-order extrapolation of reused steps on fixed plans (issue 27 item 1: per-entry orders 0-2): each plan's
reused steps refitted at first and at second order (``TrajectoryStats.fit`` / ``fit_second_order``, plan format
version 4) on the model's calibration runs recorded with ``--window`` steps, the plan's computed steps and unit reuse
kept, then the calibration runs' sampled MSE (what ``--verify`` and ``--refine`` rank plans by) and the held-out PSNR
on the sweep's evaluation inputs (``--seeds``) of each. A plan whose file is already second order (the sweep's
``invardiff-frontier2`` points) is also evaluated as it is.

Usage: python benchmarks/frontier_second_order.py --model dit-digits PLAN.json [PLAN.json ...] [--window 20]
    [--seeds 0,1,2] [--threads 1] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
from plan_scores import PlanScores

from invardiff.calibration.trajectory import STEP_STREAM, record_trajectories
from invardiff.files import write_text
from invardiff.plan import CachePlan


def refitted(plan: CachePlan, stats, order: int) -> CachePlan:
    """``plan`` with every reused step's coefficients fitted at ``order`` (2 where the window holds three computed
    steps before it, else 1; 1 where it holds two, else plain reuse)."""
    T, window = plan.num_inference_steps, stats.window
    computed = np.flatnonzero(~plan.step_cache).tolist()
    first, second = np.zeros(T), np.zeros(T)
    for t in np.flatnonzero(plan.step_cache):
        earlier = [s for s in computed if s < t][::-1]
        if order == 2 and len(earlier) >= 3 and t - earlier[2] <= window:
            first[t], second[t], _ = stats.fit_second_order(STEP_STREAM, earlier[2], earlier[1], earlier[0], t)
        elif len(earlier) >= 2 and t - earlier[1] <= window:
            first[t] = stats.fit(STEP_STREAM, earlier[1], earlier[0], t)[0]
    return dataclasses.replace(plan, step_extrapolation=first, step_extrapolation2=second if second.any() else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("plans", nargs="+")
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scores = PlanScores(args.model, [int(seed) for seed in args.seeds.split(",")])
    target, pipe = scores.target, scores.pipe
    plans = [CachePlan.load(path) for path in args.plans]
    steps, expected = {plan.num_inference_steps for plan in plans}, target.entry.num_inference_steps
    if steps != {expected}:
        parser.error(f"the plans are for {sorted(steps)} steps, {args.model} samples {expected}.")
    stats = record_trajectories(
        pipe,
        num_inference_steps=target.entry.num_inference_steps,
        cases=scores.cases,
        window=args.window,
        pipeline_kwargs=target.sampling_settings(),
    )
    lines = []
    for path, plan in zip(args.plans, plans, strict=True):
        variants = {"first order": refitted(plan, stats, 1), "second order": refitted(plan, stats, 2)}
        if plan.step_extrapolation2 is not None:
            variants["as written"] = plan
        for name, variant in variants.items():
            line = {
                "plan": path,
                "variant": name,
                "window": args.window,
                "second_order_steps": int((variant.step_extrapolation_order() == 2).sum()),
                "calibration_mse": scores.calibration_mse(variant),
                **scores.held_out(variant),
            }
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.out:
        write_text(args.out, "".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
