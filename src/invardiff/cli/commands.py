"""One thin function per ``invardiff`` subcommand: parse, call the library, print. No algorithm lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..official import bundled_books, convert_official_book
from ..plan import CachePlan


def inspect_plan(args) -> int:
    from ..stats import plan_summary

    if args.calibration_memory:
        return _calibration_memory(args)
    if args.plan is None:
        raise ValueError("inspect needs a plan file (or --calibration-memory with --model-config).")
    plan = CachePlan.load(args.plan)
    flops = config = None
    if args.memory and not args.model_config:
        raise ValueError("--memory needs --model-config (the shapes the memory depends on).")
    if args.model_config:
        from ..flops import profile_flops
        from ..model_configs import get_model_config

        config = get_model_config(args.model_config)
        flops = profile_flops(config)
    summary = plan_summary(plan, flops)
    if args.memory:
        from ..memory import cache_memory

        summary.update(cache_memory(plan, config))
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"plan: {args.plan}")
    print(
        f"model: {plan.model.model_class} ({plan.model.family}), "
        + ", ".join(f"{b.num_layers} {b.name}" for b in plan.model.block_lists)
    )
    print(f"steps: {summary['num_steps']}, step-cached: {summary['steps_reused']} {summary['step_cached_indices']}")
    print(f"{'module kind':36} {'reused':>8} {'outside step cache':>19}  reused steps outside step cache")
    for name, stat in summary["modules"].items():
        print(
            f"{name:36} {stat['reuse_fraction']:8.1%} {stat['reuse_fraction_outside_step_cache']:19.1%}  "
            f"{stat['reused_steps_outside_step_cache']}"
        )
    if flops is not None:
        print(
            f"ideal speedup on {summary['model_config']}: {summary['ideal_speedup']:.3f}x "
            f"(FLOPs executed: {summary['compute_fraction']:.1%} of full compute)"
        )
    if args.memory:
        print(
            f"peak cache memory: {summary['peak_cache_bytes'] / 2**30:.3f} GiB (keeping every unit output and H "
            f"of a step: {summary['all_outputs_bytes'] / 2**30:.3f} GiB)"
        )
    return 0


def _calibration_memory(args) -> int:
    from ..memory import calibration_memory
    from ..model_configs import get_model_config

    if not args.model_config or args.plan is not None:
        raise ValueError("--calibration-memory needs --model-config (the shapes) and no plan.")
    config = get_model_config(args.model_config)
    estimate = {"model_config": config.name, "dtype": config.dtype, **calibration_memory(config)}
    if args.json:
        print(json.dumps(estimate, indent=1))
        return 0
    gib = {k: v / 2**30 for k, v in estimate.items() if isinstance(v, int) and k != "streams"}
    print(f"calibration features per sample on {config.name} ({config.description or config.family}), {config.dtype}:")
    print(f"  reference features ({estimate['streams']} streams, one each): {gib['references']:.3f} GiB")
    print(f"  float32 working buffer of the largest stream:   {gib['working']:.3f} GiB")
    print(f"  per-sample scalars:                              {estimate['scalars']} bytes")
    former = gib["two_float32_references"]
    print(f"  total: {gib['total']:.3f} GiB (two float32 features per stream, the former recorder: {former:.3f} GiB)")
    return 0


def convert_official(args) -> int:
    plan = convert_official_book(args.book, args.family)
    plan.save(args.output)
    print(
        f"wrote {args.output}: {plan.model.model_class}, {plan.num_inference_steps} steps, "
        f"{int(plan.step_cache.sum())} step-cached"
    )
    return 0


def plot(args) -> int:
    from ..plot import plot_plan, plot_rates

    if Path(args.plan).suffix == ".npz":
        from ..calibration import CalibrationRates

        plot_rates(CalibrationRates.load(args.plan), args.output)
    else:
        plot_plan(CachePlan.load(args.plan), args.output)
    print(f"wrote {args.output}")
    return 0


def calibrate(args) -> int:
    from ..calibration import calibrate as run_calibration

    pipe, family = _load_pipeline(args)
    thresholds = _thresholds(args, family)
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        inputs = {"prompts": prompts}
    else:
        inputs = {"class_labels": [int(c) for c in args.classes.split(",")]}
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {
        "height": args.height,
        "width": args.width,
        "guidance_scale": args.guidance_scale,
        "max_sequence_length": args.max_sequence_length,
    }
    extra = {k: v for k, v in extra.items() if v is not None}
    bars = {}

    def progress(name, done, total):
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=total, desc=name))
        bar.update(1)
        if done == total:
            bar.close()

    plan, rates = run_calibration(
        pipe,
        num_inference_steps=args.steps,
        thresholds=thresholds,
        seeds=seeds,
        batch_size=args.batch_size,
        memory_budget=None if args.memory_budget_gib is None else int(args.memory_budget_gib * 2**30),
        offload=args.offload,
        pipeline_kwargs=extra,
        progress=progress,
        **inputs,
    )
    plan.save(args.output)
    rates_path = rates_path_for(args.output)
    rates.save(rates_path)
    print(
        f"wrote {args.output} ({int(plan.step_cache.sum())}/{plan.num_inference_steps} steps step-cached) "
        f"and {rates_path} ({rates.num_runs} runs)"
    )
    return 0


def build_plan(args) -> int:
    from ..calibration import CalibrationRates

    rates = CalibrationRates.load(args.rates)
    thresholds = _thresholds(args, rates.model.family) if (args.preset or args.thresholds) else None
    plan = rates.build_plan(thresholds, correction=args.correction)
    if args.max_step_run is not None:
        from ..plan_transforms import cap_step_runs

        plan = cap_step_runs(plan, args.max_step_run)
    plan.save(args.output)
    print(
        f"wrote {args.output} ({int(plan.step_cache.sum())}/{plan.num_inference_steps} steps step-cached, "
        f"correction: {plan.provenance['correction']})"
    )
    return 0


def rates_path_for(plan_path: str) -> Path:
    path = Path(plan_path)
    return path.with_name(path.stem + ".rates.npz")


def _thresholds(args, family: str):
    from ..calibration import parse_thresholds, preset

    if args.thresholds:
        return parse_thresholds(args.thresholds, family)
    if args.preset:
        return preset(family, args.preset)
    raise ValueError("Give --preset NAME or --thresholds ... (see invardiff calibrate --help).")


def _load_pipeline(args):
    from ..families import resolve_family

    if args.model_config:
        from ..model_configs import get_model_config
        from ..toy_pipelines import build_pipeline

        config = get_model_config(args.model_config)
        pipe = build_pipeline(config, config.build_transformer(args.device), text_encoders=True)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, resolve_family(pipe.transformer).name


def bench_engine(args) -> int:
    from ..bench.engine import bench_family

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    schedule = args.schedule or ("alternate" if device.type == "cuda" else "lockstep")
    available = bundled_books()
    books = args.books or [name for name in available if name.split("/")[0] in args.family]
    unknown = sorted(set(books) - set(available))
    if unknown:
        raise ValueError(f"Unknown books {unknown}; available: {sorted(available)}.")
    if args.peers:
        if args.compile:
            raise ValueError("--compile is not available with --peers yet: the peers' hooks are not compiled here.")
        return _bench_engine_peers(args, device, books)

    def run(family: str, family_books: list[str], progress) -> list[dict]:
        return bench_family(
            family, args.config, family_books, device, args.rounds, schedule, progress, compile_blocks=args.compile
        )

    by_family = {f: family_books for f, family_books in _books_by_family(books).items() if f in args.family}
    results = _per_family(args, by_family, "bench-engine", run)
    stem = f"bench-engine-{args.config}-{device.type}" + ("-compiled" if args.compile else "")
    return _report(args, results, stem, [_public_fields(r) for r in results])


def _bench_engine_peers(args, device, books: list[str]) -> int:
    _quiet_cache_dit()
    from ..bench.engine_peers import bench_peers, peers_can_run, peers_table

    by_family = _books_by_family(books)
    for family in [f for f in by_family if not peers_can_run(f)]:
        print(f"bench-engine --peers: skipping {family}: its transformer has no diffusers CacheMixin", file=sys.stderr)
        del by_family[family]
    if not by_family:
        raise ValueError("--peers needs books of a family whose transformer has diffusers' CacheMixin (e.g. flux).")

    def run(family: str, family_books: list[str], progress) -> list[dict]:
        return bench_peers(family, args.config, family_books, device, args.rounds, progress)

    results = _per_family(args, by_family, "bench-engine peers", run)
    return _report(args, results, f"bench-engine-peers-{args.config}-{device.type}", results, table=peers_table)


def _books_by_family(books: list[str]) -> dict[str, list[str]]:
    by_family: dict[str, list[str]] = {}
    for book in books:
        by_family.setdefault(book.split("/")[0], []).append(book)
    return by_family


def _per_family(args, by_family: dict[str, list[str]], label: str, run) -> list[dict]:
    """``run(family, books, progress)`` for each family, with a progress bar over its rounds."""
    results = []
    for family, family_books in by_family.items():
        with tqdm(total=args.rounds + 1, desc=f"{label} {family}", disable=args.json) as bar:
            results += run(family, family_books, lambda message: (bar.set_postfix_str(message), bar.update(1)))
    return results


def _report(args, results: list[dict], stem: str, json_results: list[dict], table=None) -> int:
    from ..bench.report import write_results

    paths = write_results(results, Path(args.out), stem, table=table)
    if args.json:
        print(json.dumps(json_results, indent=1))
    else:
        print(paths["markdown"].read_text())
        print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def _public_fields(result: dict) -> dict:
    keys = (
        "book",
        "measured_speedup",
        "ideal_speedup",
        "efficiency",
        "overhead",
        "peak_cache_bytes",
        "all_outputs_bytes",
        "model_config",
        "device",
        "schedule",
        "rounds",
        "median_seconds",
    )
    return {key: result[key] for key in keys}


def list_models(args) -> int:
    from ..models import MODELS

    rows = [
        {
            "name": m.name,
            "family": m.family,
            "pipeline": m.pipeline,
            "steps": m.num_inference_steps,
            "description": m.description,
        }
        for m in MODELS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(f"{row['name']:14} {row['pipeline']:13} {row['steps']:3} steps  {row['description']}")
    return 0


def generate(args) -> int:
    import numpy as np
    from PIL import Image

    from .. import api
    from ..models import get, load
    from .policy_args import policy_config

    entry, pipe = get(args.model), load(args.model)
    config = policy_config(args, entry.family)
    item = args.prompt if args.prompt is not None else args.class_id
    if (entry.inputs == "prompt") != (args.prompt is not None):
        raise ValueError(f"{args.model} takes {'--prompt' if entry.inputs == 'prompt' else '--class'}.")
    plan = getattr(config, "plan", None)
    steps = args.steps or (plan.num_inference_steps if plan else entry.num_inference_steps)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        api.enable(pipe, config)
    try:
        kwargs = entry.call_kwargs(item, args.seed, batch=args.batch, num_inference_steps=steps, output_type="np")
        images = pipe(**kwargs).images
        if config is not None:
            (out / "summary.json").write_text(json.dumps(api.summary(pipe).to_dict(), indent=1) + "\n")
    finally:
        if config is not None:
            api.disable(pipe)
    policy = args.policy or ("plan" if args.plan else None)
    suffix = f"-{policy.replace('+', '-')}" if policy else ""
    paths = []
    for index, image in enumerate(images):
        array = (np.asarray(image) * 255).round().astype(np.uint8)
        path = out / f"{args.model}-seed{args.seed + index}{suffix}.png"
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)
        paths.append(str(path))
    print(f"wrote {', '.join(paths)}" + (f" and {out / 'summary.json'}" if config is not None else ""))
    return 0


def demo(args) -> int:
    from ..demo import run_demo, write_report

    seeds = [int(s) for s in args.seeds.split(",")]
    with tqdm(total=args.rounds + 2, desc=f"demo {args.model}", disable=args.json) as bar:  # calibration, warm-up
        report, images = run_demo(
            args.model,
            args.preset,
            seeds,
            args.rounds,
            device=args.device,
            progress=lambda message: (bar.set_postfix_str(message), bar.update(1)),
        )
    paths = write_report(report, images, Path(args.out))
    if args.json:
        print(json.dumps(report))
    else:
        print(paths["markdown"].read_text())
        print(f"wrote {paths['json']}, {paths['markdown']} and {paths['grid']}")
    return 0


def _quiet_cache_dit() -> None:
    # cache-dit logs every enable_cache on stdout (INFO and WARNING), which would interleave with the progress bars
    # and break --json; it reads its level once, at import. A level the user set is kept.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")


def bench(args) -> int:
    _quiet_cache_dit()
    from datetime import datetime, timezone

    from ..bench.bundled import sweep_inputs
    from ..bench.sweep_report import equal_speed_table, markdown_table, plot_pareto
    from ..bench.targets import bundled_target, pipeline_target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.pipeline:
        if bool(args.prompts) == bool(args.classes):
            raise ValueError("--pipeline needs either --prompts FILE (Flux) or --classes 1,2,3 (DiT).")
        items = (
            [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
            if args.prompts
            else [int(c) for c in args.classes.split(",")]
        )
        if not args.steps:
            raise ValueError("--pipeline needs --steps N (the sampling step count to benchmark).")
        targets = [pipeline_target(args.pipeline, items, args.steps, args.guidance, args.device)]
    else:
        targets = [bundled_target(model, args.device) for model in args.model]
    for target in targets:
        model = target.name
        jsonl = out / f"sweep-{model}.jsonl"
        inputs = sweep_inputs(target, seeds, args.device)
        if args.report_only:  # tables and plots again from the JSON lines, nothing is run
            results = [json.loads(line) for line in jsonl.read_text().splitlines()]
        else:
            results = _run_bench(args, target, inputs, jsonl)
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "device": _device_name(torch.device(args.device)),
            "threads": torch.get_num_threads(),
            "images": len(inputs.cases),
            "rounds": args.rounds,
        }
        table = "\n".join(
            [
                markdown_table(model, results, meta),
                equal_speed_table(model, results),
                equal_speed_table(model, results, speed="ideal_speedup"),
            ]
        )
        (out / f"sweep-{model}.md").write_text(table)
        plot_pareto(model, results, out / f"sweep-{model}.png")
        print(table)
        print(f"wrote {jsonl}, {out / f'sweep-{model}.md'} and {out / f'sweep-{model}.png'}")
    return 0


def _device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def _run_bench(args, target, inputs, jsonl: Path) -> list[dict]:
    from ..bench.bundled import METHODS, sweep_points
    from ..bench.points import peer_points
    from ..bench.sweep import run_sweep
    from ..bench.sweep_report import append_jsonl

    done = {}
    if args.resume and jsonl.exists():
        done = {r["label"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    else:
        jsonl.unlink(missing_ok=True)
    with tqdm(desc=f"{target.name}: calibrating", total=None) as bar:
        methods = tuple(args.methods or METHODS)
        points = sweep_points(target, methods, lambda message: bar.set_postfix_str(message), peer_points)
    with tqdm(total=len(points), desc=f"{target.name}: sweep") as bar:
        bar.update(len(done))

        def on_result(result):
            append_jsonl(result, jsonl)
            bar.set_postfix_str(result["label"])
            bar.update(1)

        return run_sweep(inputs, points, args.rounds, on_result, done)
