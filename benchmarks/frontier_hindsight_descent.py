"""How good a single shared schedule could be on the evaluation images, chosen with hindsight (issue 27: flux-shapes at
4x, where the goal is +5 dB over MagCache on the sweep's 4 seed-0 images).

From a start schedule (the searched plan's computed steps), a descent on the evaluation images' own PSNR: each round
tries every interior computed step moved by -2, -1, +1 and +2 (order kept, first and last step fixed) and takes the
best move while it raises the PSNR. Each schedule's plan is :func:`invardiff.calibration.search.schedule_plan`'s on
the calibration trajectories (no unit reuse, reused steps extrapolated with coefficients fitted there), so only the
choice of steps sees the evaluation images: an upper bound on what choosing a schedule can give there, not a method.
Compare the end schedule on other seeds (``benchmarks/frontier_schedules.py --seeds 0,1,2``) to see it overfit.

Usage: python benchmarks/frontier_hindsight_descent.py --model flux-shapes --start 0,1,6,12,18,24,27 [--seeds 0]
    [--window 12] [--rounds 8] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json

import torch

import invardiff
from invardiff.bench.bundled import sweep_inputs
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.run import check_cases
from invardiff.calibration.search import SearchConfig, schedule_plan
from invardiff.calibration.trajectory import record_trajectories
from invardiff.files import write_text
from invardiff.flops import profile_flops
from invardiff.metrics import output_fidelity


MOVES = (-2, -1, 1, 2)


def neighbours(schedule: list[int]) -> list[list[int]]:
    """Every schedule with one interior computed step moved by one of :data:`MOVES`, the order kept."""
    result = []
    for index in range(1, len(schedule) - 1):
        for move in MOVES:
            moved = [*schedule]
            moved[index] += move
            if moved[index - 1] < moved[index] < moved[index + 1]:
                result.append(moved)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("--start", required=True, help="computed steps of the start schedule, comma-separated")
    parser.add_argument("--seeds", default="0", help="evaluation seeds the descent looks at (the sweep's: 0)")
    parser.add_argument("--window", type=int, default=12, help="recorded window (longest extrapolated run)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON lines file, one line per round (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = bundled_target(args.model)
    pipe = target.load()
    steps = target.entry.num_inference_steps
    cases = check_cases(target.calibration_runs())
    stats = record_trajectories(
        pipe, num_inference_steps=steps, cases=cases, window=args.window, pipeline_kwargs=target.sampling_settings()
    )
    flops = profile_flops(pipeline_call_config(pipe, target.family, target.sampling_kwargs(pipe)))
    inputs = sweep_inputs(target, [int(seed) for seed in args.seeds.split(",")])
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    # The budget only has to admit the schedules themselves: no unit reuse fills it.
    config = SearchConfig(1.0, reuse_units=False, extrapolate_steps=True)
    scores = {}

    def score(schedule: list[int]) -> tuple[float, float]:
        key = tuple(schedule)
        if key not in scores:
            found = schedule_plan(stats, flops, config, schedule)
            if found is None:
                scores[key] = (float("-inf"), 0.0)
            else:
                with invardiff.enabled(pipe, found.plan):
                    point_flops, images = count_flops(lambda: inputs.generate(pipe))
                scores[key] = (output_fidelity(images, reference)["psnr"], full_flops / point_flops)
        return scores[key]

    current = [int(step) for step in args.start.split(",")]
    rows = []

    def record(round_, schedule):
        psnr, ideal = score(schedule)
        rows.append({"round": round_, "schedule": schedule, "psnr": psnr, "ideal_speedup": ideal, "seeds": args.seeds})
        print(json.dumps(rows[-1]), flush=True)

    record(0, current)
    for round_ in range(1, args.rounds + 1):
        best = max(neighbours(current), key=lambda schedule: score(schedule)[0], default=None)
        if best is None or score(best)[0] <= score(current)[0]:
            break
        current = best
        record(round_, current)
    if args.out:
        write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
