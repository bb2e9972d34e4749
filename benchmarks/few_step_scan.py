"""Every step schedule of a few-step run, each filled to a FLOP-ideal budget with unit reuse: what plans of this
kind can reach at all (issue 27 item 4: wan-motion at 8 steps, >= 35 dB at >= 1.5x ideal).

At a few steps the schedules are few (step 0 and the last step compute; 2^(T-2) subsets of the others), so instead
of trusting the search's additive error model this scans all of them: for each schedule, the plan
``schedule_plan`` builds on it at the budget (its units allocated by the search, with or without extrapolation of
steps and units, with or without unit reuse), sampled on the calibration runs (the selection's error, as
``--verify`` samples) and on the sweep's evaluation inputs (held out: PSNR / LPIPS against full compute, per-frame
mean for video). The point kept is the one of least calibration error; the table also gives the best held-out
point (an oracle, chosen with hindsight: what the plans of this kind can give at best, not a point a user gets).

Writes benchmarks/results/sweep-few-step/scan-<model>-<T>-steps.{jsonl,md}.

Usage: python benchmarks/few_step_scan.py --model wan-motion --steps 8 --speedups 1.3,1.5 [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from invardiff import api
from invardiff.bench.bundled import sweep_inputs, sweep_name
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.budget import sample_outputs
from invardiff.calibration.search import SearchConfig, schedule_plan
from invardiff.calibration.trajectory import record_trajectories
from invardiff.files import write_text
from invardiff.flops import profile_flops
from invardiff.metrics.video import output_fidelity


OVERSHOOT = 1.15  # schedules whose plan is this much faster than the target are left out (fewer steps than needed)
SHOWN = ("target", "computed_steps", "extrapolate", "reuse_units", "ideal_speedup", "calibration_mse", "psnr")
VARIANTS = (  # (extrapolate steps and units, reuse units)
    (False, True),
    (True, True),
    (False, False),
    (True, False),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan-motion")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--speedups", default="1.3,1.5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/sweep-few-step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    steps = args.steps
    target = bundled_target(args.model, num_inference_steps=steps)
    pipe = target.load()
    kwargs = target.sampling_settings()
    cases = target.calibration_runs()
    stats = record_trajectories(pipe, num_inference_steps=steps, cases=cases, window=steps - 1, pipeline_kwargs=kwargs)
    call_kwargs = target.sampling_kwargs(pipe)
    flops = profile_flops(pipeline_call_config(pipe, target.family, call_kwargs))
    calibration_reference = sample_outputs(pipe, target.family, cases, call_kwargs, len(cases))
    inputs = sweep_inputs(target, [0])
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))

    def _evaluate(found, speedup, computed, extrapolate, units) -> dict:
        with api.enabled(pipe, found.plan):
            sampled = sample_outputs(pipe, target.family, cases, call_kwargs, len(cases))
            images = inputs.generate(pipe)
        return {
            "target": speedup,
            "computed_steps": computed,
            "extrapolate": extrapolate,
            "reuse_units": units,
            "ideal_speedup": found.ideal_speedup,  # the search's FLOP profile; counted for the picks
            "calibration_mse": float(((sampled - calibration_reference) ** 2).mean()),
            "model_error": found.error,
            "plan": found.plan,
            **output_fidelity(images, reference),
        }

    model = sweep_name(args.model, steps)
    jsonl = Path(args.out) / f"scan-{model}.jsonl"
    results, seen = [], []
    middle = range(1, steps - 1)
    for speedup in [float(s) for s in args.speedups.split(",")]:
        for extrapolate, units in VARIANTS:
            config = SearchConfig(
                speedup, extrapolate_steps=extrapolate, extrapolate_units=extrapolate, reuse_units=units
            )
            for size in range(len(middle) + 1):
                for chosen in itertools.combinations(middle, size):
                    computed = [0, *chosen, steps - 1]
                    found = schedule_plan(stats, flops, replace(config, max_run=steps - 1), computed)
                    if found is None or found.ideal_speedup > speedup * OVERSHOOT:
                        continue  # out of reach, or fewer computed steps than the budget needs: another target's
                    decisions = found.plan.to_dict()
                    key = (speedup, json.dumps([decisions["step_cache"], decisions["module_reuse"]]), extrapolate)
                    if key in seen:
                        continue
                    seen.append(key)
                    results.append(_evaluate(found, speedup, computed, extrapolate, units))
                    print(json.dumps({k: results[-1][k] for k in SHOWN}), flush=True)
                    write_text(jsonl, "".join(json.dumps(_record(r)) + "\n" for r in results))
    for speedup in sorted({r["target"] for r in results}):  # the picks' ideal speedups, FLOP-counted
        points = [r for r in results if r["target"] == speedup]
        for r in (min(points, key=lambda r: r["calibration_mse"]), max(points, key=lambda r: r["psnr"])):
            with api.enabled(pipe, r["plan"]):
                point_flops, _ = count_flops(lambda: inputs.generate(pipe))
            r["ideal_speedup"], r["flop_counted"] = full_flops / point_flops, True
    write_text(jsonl, "".join(json.dumps(_record(r)) + "\n" for r in results))
    minutes = (time.perf_counter() - started) / 60
    write_text(Path(args.out) / f"scan-{model}.md", _report(args, model, results, minutes))


def _record(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "plan"}


def _report(args, model: str, results: list[dict], minutes: float) -> str:
    lines = [
        f"# {model}: every step schedule, filled to the budget with unit reuse (held out)",
        "",
        f"`python benchmarks/few_step_scan.py --model {args.model} --steps {args.steps} --speedups {args.speedups} "
        f"--threads {args.threads}` ({minutes:.0f} min on a 2-core CPU, whatever else ran on it; "
        f"{len(results)} distinct plans). "
        "Kept: least calibration-run error (sampled); oracle: best held-out PSNR, chosen with hindsight. "
        "PSNR dB: mean (worst); ideal: FLOP-counted for the picks (the "
        "search's FLOP profile for the rest, in the JSON lines).",
        "",
        "| target | pick | computed steps | extrapolate | unit reuse | ideal | PSNR dB | LPIPS | calibration MSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for speedup in sorted({r["target"] for r in results}):
        points = [r for r in results if r["target"] == speedup]
        picks = {
            "kept (least calibration error)": min(points, key=lambda r: r["calibration_mse"]),
            "oracle (best held-out PSNR)": max(points, key=lambda r: r["psnr"]),
        }
        for pick, r in picks.items():
            lines.append(
                f"| {speedup:g}x | {pick} | {r['computed_steps']} | {'yes' if r['extrapolate'] else 'no'} | "
                f"{'yes' if r['reuse_units'] else 'no'} | {r['ideal_speedup']:.2f}x | {r['psnr']:.2f} "
                f"({r['worst']['psnr']:.2f}) | {r['lpips']:.4f} | {r['calibration_mse']:.2e} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
