"""Plans fitted to a bound on peak cache memory: FLUX.1-dev's books at 1.5 GB (FLOP-ideal speedup and peak cache,
exact, on the meta device), and the quality the bound costs on flux-shapes (PSNR / LPIPS against full compute on
its held-out examples, the bound scaled to flux-shapes' config).

    python benchmarks/cache_memory_fit.py --out benchmarks/results --part flux1-dev   # the meta-device part (~3 min)
    python benchmarks/cache_memory_fit.py --out benchmarks/results --part flux-shapes --seeds 0,1 --budgets ""

FLUX.1-dev part: each official FLUX book, fitted (``invardiff.memory_fit.fit_memory``) to 1.5 GB (10^9 bytes) in
bf16 (the model's dtype) and with an fp8 e4m3 cache; the fit's proven upper bound on the speedup any fitted plan
reaches is reported beside it; each again with step reuse (``step_reuse=0.9``: steps whose reuses cover 90% of
their unit FLOPs may become whole-step reuses). flux-shapes part: the fast preset calibrated on flux-shapes'
calibration runs, fitted to FLUX.1-dev's bound scaled to flux-shapes (the same fraction of every unit output and H
of one step), in the model dtype, in bf16 / fp8 caches, and with step reuse; and, at equal FLOP-ideal budgets (the
fitted presets', and ``--budgets``), the unbounded budgeted search against the memory-bounded one (model dtype,
bf16 cache), from one recording of the
calibration trajectories. A run of one part keeps the other's figures in the JSON.
"""

import argparse
import itertools
import json
from pathlib import Path

from invardiff import api
from invardiff.bench.bundled import calibrate_thresholds, sweep_inputs
from invardiff.bench.memory_points import FLUX1_DEV_BOUND, bound_fraction, scaled_bound
from invardiff.bench.targets import bundled_target
from invardiff.cache_footprint import measure_footprint, peak_cache_bytes
from invardiff.calibration.budget import calibrate_budget
from invardiff.calibration.search import BudgetError, MemoryBound, SearchConfig, search_plan
from invardiff.files import write_text
from invardiff.flops import profile_flops
from invardiff.memory_fit import fit_memory
from invardiff.metrics import output_fidelity
from invardiff.model_configs import MODEL_CONFIGS
from invardiff.official import bundled_books, convert_official_book
from invardiff.stats import ideal_speedup


FIT_SECONDS = 30.0
STEP_REUSE = 0.9  # fit-memory --allow-step-reuse's default: steps whose reuses cover 90% of their unit FLOPs


def flux1_dev_part() -> list[dict]:
    config = MODEL_CONFIGS["flux1-dev"]
    footprint, flops = measure_footprint(config), profile_flops(config)
    rows = []
    for name, path in bundled_books().items():
        if not name.startswith("flux/"):
            continue
        book = convert_official_book(path, "flux")
        row = {"book": name, "ideal_speedup": ideal_speedup(book, flops), "peak_cache_bytes": None, "fits": {}}
        row["peak_cache_bytes"] = peak_cache_bytes(book, footprint)
        for dtype, step_reuse in itertools.product((None, "float8_e4m3fn"), (None, STEP_REUSE)):
            fitted = fit_memory(book, footprint, flops, FLUX1_DEV_BOUND, dtype, FIT_SECONDS, step_reuse)
            record = fitted.provenance.get("memory_fit", {})
            row["fits"][(dtype or "bfloat16") + (" + step reuse" if step_reuse else "")] = {
                "steps_reused": record.get("step_reuse", {}).get("converted", []),
                "ideal_speedup": ideal_speedup(fitted, flops),
                "peak_cache_bytes": peak_cache_bytes(fitted, footprint),
                "speedup_bound": record.get("ideal_speedup", {}).get("bound", ideal_speedup(fitted, flops)),
                "optimal": record.get("optimal", True),
                "reuses_dropped": record.get("reuses_dropped", 0),
            }
        rows.append(row)
        print(json.dumps(row))
    return rows


def flux_shapes_part(seeds: list[int], budgets: list[float]) -> dict:
    target = bundled_target("flux-shapes")
    inputs = sweep_inputs(target, seeds)
    pipe = target.load()
    config = target.entry.model_config()
    footprint, flops = measure_footprint(config), profile_flops(config)
    bound = scaled_bound(footprint)
    full = inputs.generate(pipe)

    def measure(label: str, plan) -> dict:
        with api.enabled(pipe, plan):
            images = inputs.generate(pipe)
        quality = output_fidelity(images, full)
        row = {
            "plan": label,
            "ideal_speedup": ideal_speedup(plan, flops),
            "peak_cache_bytes": peak_cache_bytes(plan, footprint),
            "cache_dtype": plan.cache_dtype,
            "psnr": quality["psnr"],
            "lpips": quality["lpips"],
            "worst_psnr": quality["worst"]["psnr"],
        }
        print(json.dumps(row))
        return row

    fast = calibrate_thresholds(target, "fast")
    rows = [measure("fast preset (unbounded)", fast)]
    fitted = {}
    for dtype in (None, "bfloat16", "float8_e4m3fn"):
        fitted[dtype] = fit_memory(fast, footprint, flops, bound, dtype, FIT_SECONDS)
        rows.append(measure(f"fast preset fitted{' + ' + dtype if dtype else ''}", fitted[dtype]))
    stepped = fit_memory(fast, footprint, flops, bound, None, FIT_SECONDS, STEP_REUSE)
    steps = stepped.provenance.get("memory_fit", {}).get("step_reuse", {}).get("converted", [])
    rows.append(measure(f"fast preset fitted + step reuse (steps {steps})", stepped))
    kwargs = {**target.entry.pipeline_kwargs, "guidance_scale": target.entry.guidance_scale}
    _, stats = calibrate_budget(
        pipe,
        num_inference_steps=target.entry.num_inference_steps,
        cases=target.calibration_runs(),
        speedups=[2.0],
        pipeline_kwargs=kwargs,
    )
    fitted_speeds = (round(ideal_speedup(plan, flops), 3) for plan in (fitted[None], stepped))
    budgets = sorted({*budgets, *fitted_speeds})  # and the fitted presets'
    pairs = []
    for budget in budgets:
        entry = {"budget": budget}
        for label, memory in (
            ("unbounded", None),
            ("bounded", MemoryBound(bound, footprint)),
            ("bounded + bfloat16", MemoryBound(bound, footprint, "bfloat16")),
        ):
            try:
                plan = search_plan(stats, flops, SearchConfig(budget, memory=memory)).plan
            except BudgetError as error:
                entry[label] = {"error": str(error)}
                continue
            entry[label] = measure(f"search {budget:g}x {label}", plan)
        pairs.append(entry)
    return {
        "model_config": config.name,
        "dtype": config.dtype,
        "bound_bytes": bound,
        "bound_fraction": bound_fraction(),
        "seeds": seeds,
        "examples": len(inputs.cases),
        "rows": rows,
        "same_budget": pairs,
    }


def _gib(size) -> str:
    return f"{size / 2**30:.3f}"


def markdown(flux1_dev: list[dict] | None, flux_shapes: dict | None) -> str:
    lines = ["# Plans fitted to a cache-memory bound", ""]
    if flux1_dev:
        lines += [
            f"FLUX.1-dev 1024x1024 bf16, bound {FLUX1_DEV_BOUND / 1e9:g} GB ({_gib(FLUX1_DEV_BOUND)} GiB), "
            "meta device "
            "(exact). 'at most': no fitted plan of that book is faster (the fit's proven bound).",
            "",
            "| book | ideal | peak cache GiB | fitted, bf16 cache | at most | fitted, fp8 cache | at most |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in flux1_dev:
            bf16, fp8 = r["fits"]["bfloat16"], r["fits"]["float8_e4m3fn"]
            lines.append(
                f"| {r['book']} | {r['ideal_speedup']:.3f}x | {_gib(r['peak_cache_bytes'])} | "
                f"{bf16['ideal_speedup']:.3f}x, {_gib(bf16['peak_cache_bytes'])} GiB | {bf16['speedup_bound']:.3f}x | "
                f"{fp8['ideal_speedup']:.3f}x, {_gib(fp8['peak_cache_bytes'])} GiB | {fp8['speedup_bound']:.3f}x |"
            )
        if any("bfloat16 + step reuse" in r["fits"] for r in flux1_dev):
            lines += [
                "",
                f"With step reuse (`fit-memory --allow-step-reuse {STEP_REUSE:g}`): steps whose reuses cover "
                f"{STEP_REUSE:.0%} of their unit FLOPs may become whole-step reuses (only H kept).",
                "",
                "| book | steps reused | bf16 cache | at most | fp8 cache | at most |",
                "|---|---|---|---|---|---|",
            ]
            for r in flux1_dev:
                bf16, fp8 = r["fits"]["bfloat16 + step reuse"], r["fits"]["float8_e4m3fn + step reuse"]
                lines.append(
                    f"| {r['book']} | {bf16['steps_reused'] or '-'} | "
                    f"{bf16['ideal_speedup']:.3f}x, {_gib(bf16['peak_cache_bytes'])} GiB | "
                    f"{bf16['speedup_bound']:.3f}x | "
                    f"{fp8['ideal_speedup']:.3f}x, {_gib(fp8['peak_cache_bytes'])} GiB | {fp8['speedup_bound']:.3f}x |"
                )
        lines.append("")
    if flux_shapes:
        f = flux_shapes
        lines += [
            f"flux-shapes ({f['dtype']}), bound {f['bound_bytes']} bytes ({f['bound_fraction']:.4f} of every unit "
            f"output and H of one step, as 1.5 GB is on FLUX.1-dev); {f['examples']} held-out images (seeds "
            f"{f['seeds']}) against full compute.",
            "",
            "| plan | ideal | peak cache KiB | cache dtype | PSNR dB (worst) | LPIPS |",
            "|---|---|---|---|---|---|",
        ]
        rows = list(f["rows"])
        for pair in f["same_budget"]:
            rows += [v for k, v in pair.items() if k != "budget" and "error" not in v]
        for r in rows:
            lines.append(
                f"| {r['plan']} | {r['ideal_speedup']:.3f}x | {r['peak_cache_bytes'] / 1024:.1f} | "
                f"{r['cache_dtype'] or 'model'} | {r['psnr']:.2f} ({r['worst_psnr']:.2f}) | {r['lpips']:.4f} |"
            )
        lines += ["", "Same budget, bounded minus unbounded PSNR (dB):", ""]
        for pair in f["same_budget"]:
            base = pair["unbounded"]
            cells = []
            for key in ("bounded", "bounded + bfloat16"):
                value = pair[key]
                cells.append(
                    f"{key} {value['psnr'] - base['psnr']:+.2f}" if "psnr" in value and "psnr" in base else f"{key} -"
                )
            lines.append(f"- {pair['budget']:g}x: " + ", ".join(cells))
    return "\n".join(lines) + "\n"


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cache-memory-fit.json"
    # A run of one part keeps the other part's figures from an earlier run (--report-only: rewrite the table).
    result = json.loads(path.read_text()) if path.exists() else {"flux1-dev": None, "flux-shapes": None}
    if args.part in ("all", "flux1-dev") and not args.report_only:
        result["flux1-dev"] = flux1_dev_part()
    if args.part in ("all", "flux-shapes") and not args.report_only:
        budgets = [float(b) for b in args.budgets.split(",") if b]
        result["flux-shapes"] = flux_shapes_part([int(s) for s in args.seeds.split(",")], budgets)
    write_text(path, json.dumps(result, indent=1) + "\n")
    text = markdown(result["flux1-dev"], result["flux-shapes"])
    write_text(out / "cache-memory-fit.md", text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--part", choices=["all", "flux1-dev", "flux-shapes"], default="all")
    parser.add_argument("--seeds", default="0,1", help="evaluation seeds of flux-shapes' examples")
    parser.add_argument(
        "--budgets", default="2.0,2.5,3.0", help="FLOP-ideal budgets of the equal-budget comparison (and the fitted's)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    main(parser.parse_args())
