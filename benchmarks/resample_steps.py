"""A plan calibrated at 28 steps, resampled to 20 and 50 steps (``resample_plan``), against plans calibrated at 20
and 50 steps, on a bundled model: fidelity against full compute at the same step count and FLOP-counted speedup
(no timing). Two kinds of plan: the InvarDiff preset (quantile thresholds) and the budgeted search at 2x.
Calibration on the model's calibration inputs, evaluation on its examples (disjoint).

Usage: python benchmarks/resample_steps.py [--model flux-shapes] [--preset fast] [--budget 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import invardiff
from invardiff.bench.bundled import CALIBRATION_SEED
from invardiff.bench.sweep import count_flops
from invardiff.bench.targets import bundled_target
from invardiff.calibration import calibrate
from invardiff.calibration.budget import calibrate_budget
from invardiff.demo import _generate
from invardiff.files import write_text
from invardiff.metrics import lpips, psnr
from invardiff.plan_transforms import resample_plan


SOURCE_STEPS = 28
TARGET_STEPS = (20, 50)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    target = bundled_target(args.model)
    entry, pipe = target.entry, target.load()
    cases = [(item, CALIBRATION_SEED) for item in target.calibration]
    kwargs = {"guidance_scale": entry.guidance_scale}

    def preset_plan(steps: int):
        plan, _ = calibrate(
            pipe, num_inference_steps=steps, thresholds=args.preset, cases=cases, **_preset_guidance(target)
        )
        return plan

    def searched_plan(steps: int):
        results, _ = calibrate_budget(
            pipe, num_inference_steps=steps, cases=cases, speedups=[args.budget], pipeline_kwargs=kwargs
        )
        return results[0].plan

    rows = []
    for kind, make in ((f"invardiff {args.preset}", preset_plan), (f"search {args.budget:g}x", searched_plan)):
        source = make(SOURCE_STEPS)
        for steps in TARGET_STEPS:
            for how, plan in (("resampled from 28", resample_plan(source, steps)), ("calibrated", make(steps))):
                rows.append({"plan": kind, "steps": steps, "how": how, **_evaluate(pipe, entry, plan, steps)})
                print(json.dumps(rows[-1]))
    out = Path(args.out)
    write_text(out / f"resample-{args.model}.json", json.dumps(rows, indent=1) + "\n")
    lines = [
        f"# {args.model}: plans moved across step counts (calibrated at {SOURCE_STEPS}, resampled) vs recalibrated",
        "",
        "Fidelity against full compute at the same step count, on the model's examples (seed 0); calibration on its "
        "calibration inputs. `python benchmarks/resample_steps.py`, CPU.",
        "",
        "| plan | steps | how | ideal speedup | steps reused | PSNR dB | LPIPS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {r['steps']} | {r['how']} | {r['ideal_speedup']:.2f}x | {r['steps_reused']} | "
            f"{r['psnr']:.2f} | {r['lpips']:.4f} |"
        )
    write_text(out / f"resample-{args.model}.md", "\n".join(lines) + "\n")


def _preset_guidance(target) -> dict:
    from invardiff.bench.bundled import _calibration_guidance

    guidance = _calibration_guidance(target)
    return {"pipeline_kwargs": guidance} if guidance else {}


_REFERENCES: dict[int, tuple] = {}  # full compute per step count, computed once


def _evaluate(pipe, entry, plan, steps: int) -> dict:
    cases = [(item, 0) for item in entry.examples]
    stepped = dataclasses.replace(entry, num_inference_steps=steps)
    if steps not in _REFERENCES:
        _REFERENCES[steps] = count_flops(lambda: _generate(pipe, stepped, cases))
    full_flops, reference = _REFERENCES[steps]
    with invardiff.enabled(pipe, plan):
        flops, images = count_flops(lambda: _generate(pipe, stepped, cases))
    return {
        "ideal_speedup": full_flops / flops,
        "steps_reused": int(plan.step_cache.sum()),
        "psnr": float(psnr(images, reference).mean()),
        "lpips": float(lpips(images, reference).mean()),
    }


if __name__ == "__main__":
    main()
