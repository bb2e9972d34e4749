"""Quality of searched plans at FLOP-ideal speedup targets on a bundled model, without timing rounds (one
FLOP-counted run per point), against the peers' points of the committed sweep at equal ideal speedup.

Calibration: the model's calibration inputs (seed 1000) at the sampling guidance; evaluation: its examples
(seed 0), disjoint from them. Writes benchmarks/results/search-<model>.{jsonl,md}.

Methods: the plain search (``invardiff-search``, ``+extrap``) and, with ``--verify``, the verified selection
(``invardiff-search verified``, ``+extrap verified``: per target, the searched plan under a cap of 2, 3 or the window
on reused runs whose sampled outputs on the calibration inputs come closest to full compute).

Usage: python benchmarks/search_quality.py --model dit-digits [--trajectories PATH] [--speedups 1.5,2,2.5,3,3.5]
       [--verify]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import invardiff
from invardiff.bench.bundled import CALIBRATION_SEED, SEARCH_WINDOW, sweep_inputs
from invardiff.bench.sweep import count_flops
from invardiff.bench.sweep_report import at_speedup
from invardiff.bench.targets import bundled_target
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.budget import verified_plans
from invardiff.calibration.run import family_calibration_kwargs
from invardiff.calibration.search import SearchConfig, pareto_plans
from invardiff.calibration.trajectory import TrajectoryStats, record_trajectories
from invardiff.files import write_text
from invardiff.flops import profile_flops
from invardiff.metrics import fidelity


TARGETS = (2.0, 2.5, 3.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--trajectories", help="a .trajectories.npz recorded as below (skips the recording)")
    parser.add_argument("--speedups", default="1.5,2,2.5,3,3.5")
    parser.add_argument("--sweep", default="benchmarks/results/sweep", help="the committed sweep (peers' points)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--verify", action="store_true", help="also the verified selection's plans")
    args = parser.parse_args()
    target = bundled_target(args.model)
    entry, pipe = target.entry, target.load()
    steps = entry.num_inference_steps
    guidance = {"guidance_scale": entry.guidance_scale}
    if args.trajectories and Path(args.trajectories).exists():
        stats = TrajectoryStats.load(args.trajectories)
    else:
        cases = [(item, CALIBRATION_SEED) for item in target.calibration]
        stats = record_trajectories(
            pipe, num_inference_steps=steps, cases=cases, window=SEARCH_WINDOW, pipeline_kwargs=guidance
        )
        if args.trajectories:
            stats.save(args.trajectories)
    family = target.family
    flops = profile_flops(pipeline_call_config(pipe, family, {"num_inference_steps": steps, **guidance}))
    inputs = sweep_inputs(target, [0])
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    speedups = [float(s) for s in args.speedups.split(",")]
    results = []
    calibration = [(item, CALIBRATION_SEED) for item in target.calibration]
    call_kwargs = {"num_inference_steps": steps, **family_calibration_kwargs(family), **guidance}
    for method, extrapolate in (("invardiff-search", False), ("invardiff-search+extrap", True)):
        config = SearchConfig(max(speedups), extrapolate_steps=extrapolate, extrapolate_units=extrapolate)
        found_plans = [(method, found) for found in pareto_plans(stats, flops, speedups, config)]
        if args.verify:
            verified = verified_plans(pipe, stats, flops, speedups, config, calibration, call_kwargs)
            found_plans += [(f"{method} verified", found) for found in verified]
        for method_label, found in found_plans:
            with invardiff.enabled(pipe, found.plan):
                point_flops, images = count_flops(lambda: inputs.generate(pipe))
            metrics = fidelity(images, reference)
            result = {
                "method": method_label,
                "label": f"{method_label} {found.plan.provenance['search']['speedup']:g}x",
                "settings": {**found.plan.provenance["search"], "calibration_error": found.error},
                "ideal_speedup": full_flops / point_flops,
                "planned_ideal_speedup": found.ideal_speedup,
                "steps_computed": int((~found.plan.step_cache).sum()),
                **{k: metrics[k] for k in ("psnr", "ssim", "lpips", "worst")},
            }
            results.append(result)
            print(json.dumps({k: result[k] for k in ("label", "ideal_speedup", "psnr", "lpips")}))
    out = Path(args.out)
    write_text(out / f"search-{args.model}.jsonl", "".join(json.dumps(result) + "\n" for result in results))
    sweep = [json.loads(line) for line in (Path(args.sweep) / f"sweep-{args.model}.jsonl").read_text().splitlines()]
    write_text(out / f"search-{args.model}.md", _table(args.model, results, sweep))


def _table(model: str, results: list[dict], sweep: list[dict]) -> str:
    lines = [
        f"# {model}: searched plans at FLOP-ideal speedup targets (held-out evaluation)",
        "",
        "Plans searched on the calibration inputs' trajectories, evaluated on the model's examples (seed 0) against "
        "full compute; ideal speedup = FLOP-counted. `python benchmarks/search_quality.py --model "
        f"{model}` (CPU). Peers and the other methods: the committed sweep (`benchmarks/results/sweep`).",
        "",
        "| point | ideal speedup | steps computed | PSNR dB (worst) | LPIPS (worst) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['ideal_speedup']:.2f}x | {r['steps_computed']} | {r['psnr']:.2f} "
            f"({r['worst']['psnr']:.2f}) | {r['lpips']:.4f} ({r['worst']['lpips']:.4f}) |"
        )
    lines += [
        "",
        "## At equal FLOP-ideal speedup (interpolated along each method's Pareto front; — : out of its range)",
        "",
        "| method | " + " | ".join(f"PSNR @ {s:g}x | LPIPS @ {s:g}x" for s in TARGETS) + " |",
        "|---|" + "---|---|" * len(TARGETS),
    ]
    methods: dict[str, list[dict]] = {}
    for r in [*results, *sweep]:
        if "error" not in r and "psnr" in r:
            methods.setdefault(r["method"], []).append(r)
    for method, points in methods.items():
        cells = []
        for speed in TARGETS:
            for metric, digits in (("psnr", 2), ("lpips", 4)):
                value = at_speedup(points, metric, speed, speed="ideal_speedup")
                cells.append("—" if value is None else f"{value:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
