"""A plan calibrated at the model's own step count (28 on flux-shapes), resampled to other counts (default 20 and
50; ``--steps 8,4``: a few-step sampler) with ``resample_plan``, against plans calibrated at those counts, on a
bundled model: fidelity against full compute at the same step count and FLOP-counted speedup (no timing). Two kinds
of plan: the InvarDiff preset (quantile thresholds) and the budgeted search at ``--budget``. Calibration on the
model's calibration runs, evaluation on its examples (disjoint).

Usage: python benchmarks/resample_steps.py [--model flux-shapes] [--preset fast] [--budget 2] [--steps 20,50]
(writes resample-MODEL.{json,md}; other --steps: resample-MODEL-STEPS.{json,md}, e.g. resample-flux-shapes-8-4)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import invardiff
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.calibration import calibrate
from invardiff.calibration.budget import calibrate_budget
from invardiff.demo import generate_cases
from invardiff.files import write_text
from invardiff.metrics import lpips, psnr
from invardiff.plan_transforms import resample_plan


TARGET_STEPS = (20, 50)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--steps", default=",".join(map(str, TARGET_STEPS)), help="comma-separated step counts")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    steps_list = tuple(int(part) for part in args.steps.split(","))
    target = bundled_target(args.model)
    entry, pipe = target.entry, target.load()
    source_steps = entry.num_inference_steps
    cases = target.calibration_runs()  # the held-out rule, as in the sweep
    kwargs = {**entry.pipeline_kwargs, "guidance_scale": entry.guidance_scale}

    def preset_plan(steps: int):
        plan, _ = calibrate(
            pipe,
            num_inference_steps=steps,
            thresholds=args.preset,
            cases=cases,
            pipeline_kwargs=target.calibration_kwargs() or None,
        )
        return plan

    def searched_plan(steps: int):
        results, _ = calibrate_budget(
            pipe, num_inference_steps=steps, cases=cases, speedups=[args.budget], pipeline_kwargs=kwargs
        )
        return results[0].plan

    rows = []
    for kind, make in ((f"invardiff {args.preset}", preset_plan), (f"search {args.budget:g}x", searched_plan)):
        source = make(source_steps)
        for steps in steps_list:
            resampled = (f"resampled from {source_steps}", resample_plan(source, steps))
            for how, plan in (resampled, ("calibrated", make(steps))):
                rows.append({"plan": kind, "steps": steps, "how": how, **_evaluate(pipe, entry, plan, steps)})
                print(json.dumps(rows[-1]))
    out = Path(args.out)
    name = args.model if steps_list == TARGET_STEPS else f"{args.model}-{'-'.join(map(str, steps_list))}"
    write_text(out / f"resample-{name}.json", json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python benchmarks/resample_steps.py", *sys.argv[1:]])
    lines = [
        f"# {args.model}: plans moved across step counts (calibrated at {source_steps}, resampled) vs recalibrated",
        "",
        "Fidelity against full compute at the same step count, on the model's examples (seed 0); calibration on its "
        f"calibration runs. `{command}`, CPU.",
        "",
        "| plan | steps | how | ideal speedup | steps reused | PSNR dB | LPIPS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {r['steps']} | {r['how']} | {r['ideal_speedup']:.2f}x | {r['steps_reused']} | "
            f"{r['psnr']:.2f} | {r['lpips']:.4f} |"
        )
    write_text(out / f"resample-{name}.md", "\n".join(lines) + "\n")


_REFERENCES: dict[int, tuple] = {}  # full compute per step count, computed once


def _evaluate(pipe, entry, plan, steps: int) -> dict:
    cases = [(item, 0) for item in entry.examples]
    stepped = dataclasses.replace(entry, num_inference_steps=steps)
    if steps not in _REFERENCES:
        _REFERENCES[steps] = count_flops(lambda: generate_cases(pipe, stepped, cases))
    full_flops, reference = _REFERENCES[steps]
    with invardiff.enabled(pipe, plan):
        flops, images = count_flops(lambda: generate_cases(pipe, stepped, cases))
    return {
        "ideal_speedup": full_flops / flops,
        "steps_reused": int(plan.step_cache.sum()),
        "psnr": float(psnr(images, reference).mean()),
        "lpips": float(lpips(images, reference).mean()),
    }


if __name__ == "__main__":
    main()
