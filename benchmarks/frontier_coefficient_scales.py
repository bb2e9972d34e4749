"""Are a plan's fitted step coefficients the best its sampled error allows? Each reused-step run's coefficients (the
least-squares fits of ``calibration/trajectory.py``, one step at a time) scaled by a factor, the factors chosen by
coordinate descent on the sampled error of the calibration runs (what ``--refine`` measures), then evaluated held
out. A diagnostic, not a plan option: on the flux-shapes 4x plan it lowers the calibration MSE by 7% and does not
carry over held out (the notes in ``results/frontier/README.md``).

Each line of the output: the factors per reused run, the calibration MSE, and the held-out PSNR (mean over the
evaluated images and per seed). A first line per ``--global-scales`` value scales every coefficient alike.

Usage: python benchmarks/frontier_coefficient_scales.py --model flux-shapes PLAN.json [--seeds 0,1,2]
    [--global-scales 0.5,0.8,1.2] [--factors 0,0.5,0.8,1.2,1.5,2] [--sweeps 2] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from plan_scores import PlanScores

from invardiff.files import write_text
from invardiff.plan import CachePlan


# A move is kept when it lowers the calibration MSE by more than this fraction (run-to-run float noise is far below).
MIN_GAIN = 0.005


def reused_runs(plan: CachePlan) -> list[list[int]]:
    """The runs of consecutive step-cached steps, as lists of step indices."""
    runs, current = [], []
    for step, cached in enumerate(plan.step_cache):
        if cached:
            current.append(step)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def scaled(plan: CachePlan, runs: list[list[int]], factors: list[float]) -> CachePlan:
    coefficients = plan.step_extrapolation.copy()
    for run, factor in zip(runs, factors, strict=True):
        coefficients[run] *= factor
    return dataclasses.replace(plan, step_extrapolation=coefficients)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("plan")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--global-scales", default="0.5,0.8,1.2")
    parser.add_argument("--factors", default="0,0.5,0.8,1.2,1.5,2")
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = CachePlan.load(args.plan)
    if plan.step_extrapolation is None:
        parser.error(f"{args.plan} has no step coefficients to scale")
    scores = PlanScores(args.model, [int(seed) for seed in args.seeds.split(",")])
    calibration_mse, held_out = scores.calibration_mse, scores.held_out
    runs = reused_runs(plan)

    lines = []

    def report(kind: str, factors: list[float], mse: float) -> None:
        line = {"kind": kind, "factors": factors, "calibration_mse": mse, **held_out(scaled(plan, runs, factors))}
        lines.append(line)
        print(json.dumps(line), flush=True)

    ones = [1.0] * len(runs)
    report("fitted", ones, calibration_mse(plan))
    for scale in (float(s) for s in args.global_scales.split(",")):
        report("global", [scale] * len(runs), calibration_mse(scaled(plan, runs, [scale] * len(runs))))
    factors, best = ones, lines[0]["calibration_mse"]
    for _ in range(args.sweeps):
        for index in range(len(runs)):
            for factor in (float(f) for f in args.factors.split(",")):
                trial = factors[:index] + [factor] + factors[index + 1 :]
                mse = calibration_mse(scaled(plan, runs, trial))
                if mse < best * (1 - MIN_GAIN):
                    factors, best = trial, mse
    report("descent", factors, best)
    if args.out:
        write_text(args.out, "".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
