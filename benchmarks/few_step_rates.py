"""How far each stream of a bundled model moves between consecutive steps at a given step count, and each unit's
share of a step's FLOPs: the recorded rates that say which units a few-step plan could reuse cheaply.

Per stream (the pre-head hidden state H, ``step``, and every reusable unit): the RMS of ``f_t - f_(t-1)`` over the
RMS of H at step t (``TrajectoryStats.relative``: what a reuse adds to the residual stream, on H's scale), for
t = 1 .. T-1, and the same residual after a least-squares extrapolation from steps t-2 and t-1. Recorded on the
model's calibration runs (full compute, at its sampling guidance).

Usage: python benchmarks/few_step_rates.py --model wan-motion --steps 8 [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from invardiff.bench.targets import bundled_target
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.trajectory import STEP_STREAM, record_trajectories
from invardiff.flops import profile_flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-motion")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = bundled_target(args.model, num_inference_steps=args.steps)
    pipe = target.load()
    kwargs = target.sampling_settings()
    stats = record_trajectories(
        pipe, num_inference_steps=args.steps, cases=target.calibration_runs(), window=2, pipeline_kwargs=kwargs
    )
    call_kwargs = target.sampling_kwargs(pipe)
    flops = profile_flops(pipeline_call_config(pipe, target.family, call_kwargs))
    print(f"# {args.model} at {args.steps} steps: unit FLOPs (share of a step, all layers) and relative moves\n")
    for block_list, units in flops.units.items():
        for unit, per_layer in units.items():
            print(f"- {block_list}.{unit}: {per_layer.sum() / flops.full_step:.3f} of a step")
    steps = range(1, args.steps)
    print("\n| stream | reuse of t-1 at t = " + ", ".join(map(str, steps)) + " | extrapolated from t-2, t-1 |")
    print("|---|---|---|")
    for stream in [STEP_STREAM, *stats.unit_streams]:
        reuse = [stats.relative(stream, stats.reuse_error(stream, t - 1, t), t) for t in steps]
        extrap = [stats.relative(stream, stats.fit(stream, t - 2, t - 1, t)[1], t) for t in steps if t >= 2]
        print(f"| {stream} | {' '.join(f'{x:.3f}' for x in reuse)} | {' '.join(f'{x:.3f}' for x in extrap)} |")


if __name__ == "__main__":
    main()
