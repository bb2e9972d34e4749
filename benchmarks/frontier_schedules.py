"""Given computed-step schedules on a bundled model, the searched plan of each (``schedule_plan``: units allocated to
meet the target, or none with ``--no-units``), its calibration-set output error and its held-out quality; and the
modelled error of the step stream's reuse with extrapolation of order 0, 1 and 2 on each schedule (issue 27 item 1:
what limits the 5x frontier, and whether second-order extrapolation would pay).

The extrapolation orders: order 0 reuses the last computed H; order 1 fits ``H_a + c (H_a - H_p)``; order 2 fits
``H_a + c1 (H_a - H_p) + c2 (H_p - H_q)`` over the last three computed steps, coefficients by least squares pooled over
the calibration samples (the Gram matrices of ``calibration/trajectory.py``; ``--window`` must cover ``t - q``).
Sum over the reused steps of the relative RMS error, as the search's additive model counts it.

Usage: python benchmarks/frontier_schedules.py --model flux-shapes --window 8 --speedup 5 \\
    --schedules "0,1,7,13,20,27 0,5,9,16,24,27" [--no-units] [--extrapolate-steps] [--seeds 0,1,2]
    [--orders-window 20]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import invardiff
from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.budget import sample_outputs
from invardiff.calibration.run import check_cases
from invardiff.calibration.search import SearchConfig, schedule_plan
from invardiff.calibration.trajectory import STEP_STREAM, record_trajectories
from invardiff.flops import profile_flops
from invardiff.metrics import output_fidelity


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("--window", type=int, default=8, help="recorded window (longest reused run)")
    parser.add_argument("--speedup", type=float, default=5.0)
    parser.add_argument(
        "--schedules", required=True, help="computed steps, comma-separated; schedules space-separated"
    )
    parser.add_argument("--no-units", action="store_true", help="no unit reuse (the schedule's own speedup)")
    parser.add_argument("--extrapolate-steps", action="store_true", help="reused steps extrapolate (fitted c)")
    parser.add_argument("--seeds", default="0", help="evaluation seeds (the sweep's: 0; more: a larger held-out set)")
    parser.add_argument("--orders-window", type=int, default=0, help="also record this window for orders 0-2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    schedules = [[int(s) for s in text.split(",")] for text in args.schedules.split()]
    target = bundled_target(args.model)
    entry, pipe = target.entry, target.load()
    kwargs = target.sampling_settings()
    cases = check_cases(target.calibration_runs())
    steps = entry.num_inference_steps
    call_kwargs = target.sampling_kwargs(pipe)
    stats = record_trajectories(
        pipe, num_inference_steps=steps, cases=cases, window=args.window, pipeline_kwargs=kwargs
    )
    flops = profile_flops(pipeline_call_config(pipe, target.family, call_kwargs))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    inputs = sweep_inputs(target, seeds)
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    calibration = sample_outputs(pipe, target.family, cases, call_kwargs, len(cases))
    config = SearchConfig(args.speedup, reuse_units=not args.no_units, extrapolate_steps=args.extrapolate_steps)
    for schedule in schedules:
        result = schedule_plan(stats, flops, config, schedule)
        if result is None:
            print(json.dumps({"schedule": schedule, "feasible": False}))
            continue
        with invardiff.enabled(pipe, result.plan):
            sampled = sample_outputs(pipe, target.family, cases, call_kwargs, len(cases))
            point_flops, images = count_flops(lambda: inputs.generate(pipe))
        fidelity = output_fidelity(images, reference)
        row = {
            "schedule": schedule,
            "units": not args.no_units,
            "extrapolate_steps": args.extrapolate_steps,
            "ideal_speedup": full_flops / point_flops,
            "calibration_mse": float(((sampled - calibration) ** 2).mean()),
            "psnr": fidelity["psnr"],
            "worst_psnr": fidelity["worst"]["psnr"],
            "per_image_psnr": fidelity["per_image"]["psnr"],  # seed-major: every example, then the next seed
            "seeds": seeds,
        }
        print(json.dumps(row), flush=True)
    if args.orders_window:
        long = record_trajectories(
            pipe, num_inference_steps=steps, cases=cases, window=args.orders_window, pipeline_kwargs=kwargs
        )
        for schedule in schedules:
            print(json.dumps({"schedule": schedule, "step_error_by_order": order_errors(long, schedule)}))


def order_errors(stats, computed: list[int]) -> dict[int, float]:
    """Modelled step error of ``computed`` per extrapolation order (0, 1, 2), see the module docstring."""
    totals = {0: 0.0, 1: 0.0, 2: 0.0}
    for t in range(stats.num_steps):
        if t in computed:
            continue
        earlier = [s for s in computed if s < t][::-1]  # the last computed step first
        for order in totals:
            basis = earlier[: order + 1]  # fewer at the start of the schedule
            totals[order] += stats.relative(STEP_STREAM, residual(stats, t, basis)[0], t)
    return totals


def residual(stats, t: int, basis: list[int]) -> tuple[float, np.ndarray]:
    """Least-squares residual ``|f_t - f_a - sum_k c_k (f_(b_k) - f_(b_(k+1)))|^2`` over the samples (``a = basis[0]``)
    and the coefficients ``c``."""

    def inner(x, y) -> float:  # x, y: [(weight, step), ...]
        return sum(wx * wy * stats.inner(STEP_STREAM, sx, sy) for wx, sx in x for wy, sy in y)

    goal = [(1.0, t), (-1.0, basis[0])]
    differences = [[(1.0, basis[k]), (-1.0, basis[k + 1])] for k in range(len(basis) - 1)]
    plain = inner(goal, goal)
    if not differences:
        return max(plain, 0.0), np.zeros(0)
    gram = np.array([[inner(x, y) for y in differences] for x in differences])
    cross = np.array([inner(x, goal) for x in differences])
    coefficients = np.linalg.lstsq(gram, cross, rcond=None)[0]
    return max(plain - float(coefficients @ cross), 0.0), coefficients


if __name__ == "__main__":
    main()
