"""The high-speed frontier: verified budgeted plans at 4x, 4.5x and 5x FLOP-ideal on a bundled model, held out,
beside the peers' most aggressive points of the committed sweep (issue 27 item 1).

Calibration: one recording of the model's calibration runs (the sweep's held-out rule, ``targets.py``) shared by
every target and both methods; each target's plan is the verified selection of ``calibrate_budget(verify=True)``
(``calibration/budget.py``: caps of 2, 3 and the window on reused runs, each with and without unit reuse, sampled on
the calibration inputs). Evaluation: the sweep's evaluation inputs (``sweep_inputs``: the model's examples, seed 0;
wan-motion its first two clips), one FLOP-counted run per point (ideal = full compute's FLOPs / the point's), PSNR /
SSIM / LPIPS against full compute (video: per-frame means). ``--rounds N`` also times each point against full
compute in N alternating rounds (``bench/sweep.py``'s measurement; indicative on a loaded machine).

Writes benchmarks/results/frontier/frontier-<model>.{jsonl,md}.

Methods (``--methods``, :data:`METHODS`): the search, ``+extrap`` (steps and units extrapolated), ``+stepextrap``
(steps only) and ``+stepfit`` (steps only, fitted up to H's scale). ``--seeds 0,1,2`` evaluates on the examples with
more seeds (a larger held-out set; PSNR also per seed); ``--step-reuse residual`` samples the candidates and evaluates
the plans with residual step reuse (``PlanConfig.step_reuse``); ``--unit-weight W`` / ``--warmup N`` search with
``SearchConfig(unit_weight=W, warmup_steps=N)``; ``--calibration-seeds K`` calibrates on every calibration input
with K noise seeds (K times the sweep's calibration runs: more inputs to rank the candidates on);
``--calibration-inputs examples`` calibrates on the evaluated examples with other noise (seeds from 1000) instead,
``both`` on the two sets.

``--steps N`` runs the model at N sampling steps instead of its own (a few-step frontier: full compute at N steps is
the reference, the plans are searched at N steps; files ``frontier-<model>-N-steps*``, peers from the few-step
sweep ``benchmarks/results/sweep-few-step/sweep-<model>-N-steps.jsonl``).

Usage: python benchmarks/frontier.py --model flux-shapes [--speedups 4,4.5,5] [--rounds 0] [--threads 1] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from invardiff.bench.bundled import SEARCH_WINDOW, sweep_folder, sweep_inputs, sweep_name
from invardiff.bench.points import plan_point
from invardiff.bench.sweep import count_flops, run_point
from invardiff.bench.targets import CALIBRATION_SEED, bundled_target
from invardiff.calibration.batching import pipeline_call_config
from invardiff.calibration.budget import unit_setting, verified_plans
from invardiff.calibration.search import SearchConfig
from invardiff.calibration.trajectory import record_trajectories
from invardiff.files import write_text
from invardiff.flops import profile_flops
from invardiff.metrics import output_fidelity
from invardiff.policies.plan import PlanConfig


# method -> SearchConfig settings. "+stepextrap": reused steps extrapolated, units reused plainly; "+stepfit": the
# same with the coefficient fitted up to H's scale (SearchConfig.step_fit="scale_free").
METHODS = {
    "invardiff-search": {},
    "invardiff-search+extrap": {"extrapolate_steps": True, "extrapolate_units": True},
    "invardiff-search+stepextrap": {"extrapolate_steps": True},
    "invardiff-search+stepfit": {"extrapolate_steps": True, "step_fit": "scale_free"},
}
PEERS = ("diffusers-fbcache", "diffusers-magcache", "diffusers-taylorseer", "cache-dit", "dicache", "plan+probe")
GOALS = {4.0: 33.0, 5.0: 30.0}  # the PSNR goals (dB) at these FLOP-ideal speedups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="flux-shapes")
    parser.add_argument("--speedups", default="4,4.5,5")
    parser.add_argument("--rounds", type=int, default=0, help="timing rounds per point (0: quality only)")
    parser.add_argument("--window", type=int, default=SEARCH_WINDOW, help="longest reuse run the recording supports")
    parser.add_argument("--refine", type=int, default=0, help="rounds of descent on sampled error (budget.py)")
    parser.add_argument("--methods", default="invardiff-search,invardiff-search+extrap")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a loaded machine)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    parser.add_argument("--sweep", default=None, help="the committed sweep (peers' points); default: the model's")
    parser.add_argument(
        "--step-reuse",
        default="state",
        choices=["state", "residual"],
        help="what reused steps take (PlanConfig.step_reuse), in the verified selection and the evaluation",
    )
    parser.add_argument(
        "--seeds", default="0", help="evaluation seeds of the examples (the sweep's: 0; more: a larger held-out set)"
    )
    parser.add_argument(
        "--unit-weight", type=float, default=1.0, help="SearchConfig.unit_weight: a unit's error against a step's"
    )
    parser.add_argument("--warmup", type=int, default=1, help="SearchConfig.warmup_steps: leading steps computed")
    parser.add_argument(
        "--calibration-inputs",
        default="calibration",
        choices=["calibration", "examples", "both"],
        help="what the search calibrates on: the model's calibration inputs (the sweep's), its evaluated examples "
        f"with other noise (seeds from {CALIBRATION_SEED}, the held-out rule of your own pipelines), or both",
    )
    parser.add_argument(
        "--calibration-seeds",
        type=int,
        default=1,
        help="noise seeds per calibration input (1: the sweep's calibration runs; K: K runs of each, new seeds)",
    )
    parser.add_argument("--out", default="benchmarks/results/frontier")
    args = parser.parse_args()
    methods = args.methods.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        parser.error(f"--methods takes names from {sorted(METHODS)}, got {unknown[0]!r}")
    if args.rounds and args.step_reuse != "state":
        parser.error("--rounds times plans with state reuse only (bench.points.plan_point); use --rounds 0")
    torch.set_num_threads(args.threads)
    speedups = [float(s) for s in args.speedups.split(",")]
    target = bundled_target(args.model, num_inference_steps=args.steps)
    model = sweep_name(args.model, args.steps)
    sweep_dir = Path(args.sweep or sweep_folder(args.steps))
    entry, pipe = target.entry, target.load()
    steps = entry.num_inference_steps
    kwargs = target.sampling_settings()
    cases = _calibration_cases(target, args.calibration_inputs, args.calibration_seeds)
    inputs = sweep_inputs(target, seeds)
    calibrated = set(cases)
    leaked = [case for case in inputs.cases if (case["input"], case["seed"]) in calibrated]
    if leaked:  # the held-out rule (bench/targets.py) for the added calibration runs
        parser.error(f"calibration runs {leaked[:4]} are evaluated too: choose other --seeds or --calibration-seeds")
    started = time.perf_counter()
    suffix = (
        (f"-refine{args.refine}" if args.refine else "")
        + (f"-window{args.window}" if args.window != SEARCH_WINDOW else "")
        + (f"-{args.step_reuse}" if args.step_reuse != "state" else "")
        + (f"-unitweight{args.unit_weight:g}" if args.unit_weight != 1.0 else "")
        + (f"-warmup{args.warmup}" if args.warmup != 1 else "")
        + (f"-cal{args.calibration_inputs}" if args.calibration_inputs != "calibration" else "")
        + (f"-calseeds{args.calibration_seeds}" if args.calibration_seeds != 1 else "")
        + (f"-seeds{args.seeds.replace(',', '')}" if seeds != [0] else "")
    )
    stats = record_trajectories(
        pipe, num_inference_steps=steps, cases=cases, window=args.window, pipeline_kwargs=kwargs
    )
    call_kwargs = target.sampling_kwargs(pipe)
    flops = profile_flops(pipeline_call_config(pipe, target.family, call_kwargs))
    full_flops, reference = count_flops(lambda: inputs.generate(pipe))
    full = {"images": reference, "flops": full_flops}
    out = Path(args.out)
    results = []
    for method in methods:
        config = SearchConfig(max(speedups), unit_weight=args.unit_weight, warmup_steps=args.warmup, **METHODS[method])
        found_plans = verified_plans(
            pipe, stats, flops, speedups, config, cases, call_kwargs, refine=args.refine, step_reuse=args.step_reuse
        )
        for found in found_plans:
            search = found.plan.provenance["search"]
            label = f"{method} {search['speedup']:g}x"
            found.plan.save(out / "plans" / f"{model}{suffix}-{method}-{search['speedup']:g}x.json")
            if args.rounds:
                point = plan_point(label, found.plan, dict(search), method=method)
                result = run_point(inputs, pipe, full, point, args.rounds)
            else:
                import invardiff

                with invardiff.enabled(pipe, PlanConfig(found.plan, step_reuse=args.step_reuse)):
                    point_flops, images = count_flops(lambda: inputs.generate(pipe))
                result = {
                    "method": method,
                    "label": label,
                    "settings": dict(search),
                    "ideal_speedup": full_flops / point_flops,
                    **output_fidelity(images, reference),
                }
            if len(seeds) > 1:  # cases run seed-major: every example with the first seed, then the next seed
                per_seed = np.array(result["per_image"]["psnr"]).reshape(len(seeds), -1)
                result["psnr_by_seed"] = {seed: float(row.mean()) for seed, row in zip(seeds, per_seed, strict=True)}
            result["target"] = search["speedup"]
            result["steps_computed"] = int((~found.plan.step_cache).sum())
            result["computed_steps"] = [int(t) for t in (~found.plan.step_cache).nonzero()[0]]
            result["calibration_error"] = found.error
            if "refined" in search:
                result["refine_moves"] = len(search["refined"]["moves"]) - 1
            results.append(result)
            print(json.dumps({k: result.get(k) for k in ("label", "ideal_speedup", "measured_speedup", "psnr")}))
            write_text(out / f"frontier-{model}{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    minutes = (time.perf_counter() - started) / 60
    sweep = [json.loads(line) for line in (sweep_dir / f"sweep-{model}.jsonl").read_text().splitlines()]
    write_text(out / f"frontier-{model}{suffix}.md", _report(args, model, results, sweep, minutes))


def _calibration_cases(target, inputs: str, seeds_per_input: int) -> list[tuple]:
    """The target's calibration runs (``inputs="examples"``: its evaluated examples, seeds from
    :data:`CALIBRATION_SEED`, instead; ``"both"``: those after the calibration runs), each input repeated with
    ``seeds_per_input - 1`` more noise seeds after the last one it uses."""
    runs = target.calibration_runs() if inputs != "examples" else []
    if inputs != "calibration":
        runs += [(item, CALIBRATION_SEED + index) for index, item in enumerate(target.entry.examples)]
    last = max(seed for _, seed in runs)
    cases = runs + [
        (item, last + 1 + k * len(runs) + index)
        for k in range(seeds_per_input - 1)
        for index, (item, _) in enumerate(runs)
    ]
    return cases


def _report(args, model: str, results: list[dict], sweep: list[dict], minutes: float) -> str:
    video = any("clip_psnr" in r for r in results)
    steps = f" --steps {args.steps}" if args.steps else ""
    extra = f"--step-reuse {args.step_reuse} " if args.step_reuse != "state" else ""
    extra += f"--seeds {args.seeds} " if args.seeds != "0" else ""
    extra += f"--unit-weight {args.unit_weight:g} " if args.unit_weight != 1.0 else ""
    extra += f"--warmup {args.warmup} " if args.warmup != 1 else ""
    extra += f"--calibration-inputs {args.calibration_inputs} " if args.calibration_inputs != "calibration" else ""
    extra += f"--calibration-seeds {args.calibration_seeds} " if args.calibration_seeds != 1 else ""
    lines = [
        f"# {model}: verified budgeted plans at high FLOP-ideal speedups (held out)",
        "",
        f"`python benchmarks/frontier.py --model {args.model}{steps} --speedups {args.speedups} "
        f"--rounds {args.rounds} --window {args.window} --refine {args.refine} --methods {args.methods} "
        f"{extra}--threads {args.threads}` "
        f"({minutes:.0f} min on a 2-core CPU, whatever else ran on it). Plans searched and verified on the "
        f"calibration runs, evaluated on the sweep's evaluation inputs (seeds {args.seeds}) against full compute; "
        "ideal speedup = FLOP-counted. PSNR"
        + (" = mean over frames" if video else "")
        + ": mean (worst)"
        + ("; then the mean per seed" if "," in args.seeds else "")
        + ".",
        "",
        "| point | ideal | measured | PSNR dB | LPIPS | steps computed | kept candidate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["settings"]
        measured = f"{r['measured_speedup']:.2f}x" if "measured_speedup" in r else "—"
        kept = f"max_run {s['max_run']}, units {unit_setting(s)}"
        if "refine_moves" in r:
            kept += f", {r['refine_moves']} refining moves"
        lines.append(
            f"| {r['label']} | {r['ideal_speedup']:.2f}x | {measured} | {r['psnr']:.2f} ({r['worst']['psnr']:.2f})"
            + "".join(f"; seed {seed}: {value:.2f}" for seed, value in r.get("psnr_by_seed", {}).items())
            + " "
            f"| {r['lpips']:.4f} | {r['steps_computed']} {r['computed_steps']} | {kept} |"
        )
    lines += [
        "",
        "## Peers: their most aggressive point in the committed sweep (highest ideal speedup)",
        "",
        "| method | point | ideal | measured | PSNR dB | LPIPS |",
        "|---|---|---|---|---|---|",
    ]
    for method in PEERS:
        points = [p for p in sweep if p.get("method") == method and "psnr" in p]
        if not points:
            continue
        fastest = max(points, key=lambda p: p["ideal_speedup"])
        lines.append(
            f"| {method} | {fastest['label']} | {fastest['ideal_speedup']:.2f}x | "
            f"{fastest.get('measured_speedup', 0):.2f}x | {fastest['psnr']:.2f} | {fastest['lpips']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
