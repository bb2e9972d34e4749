"""One thin function per ``invardiff`` subcommand: parse, call the library, print. No algorithm lives here."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..files import atomic_path, read_json_lines, write_text
from ..official import convert_official_book
from ..plan import CachePlan
from .parsing import int_list, read_prompts


def inspect_plan(args) -> int:
    from ..bench.extrapolation_cost import second_order_text
    from ..stats import plan_summary

    if args.calibration_memory:
        return _calibration_memory(args)
    if args.plan is None:
        raise ValueError("inspect needs a plan file (or --calibration-memory with --model-config).")
    plan = CachePlan.load(args.plan)
    flops = None
    config = _inspected_config(args)
    if args.memory and config is None:
        raise ValueError("--memory needs --model-config or --model (the shapes the memory depends on).")
    if config is not None:
        from ..flops import profile_flops

        flops = profile_flops(config)
    summary = plan_summary(plan, flops)
    full_run = plan.num_inference_steps * flops.full_step if flops is not None else None
    if config is not None:
        summary["call_shape"] = _call_shape(config)
    if args.memory:
        from ..memory import cache_memory

        summary.update(cache_memory(plan, config))
        summary.update(_memory_by_cache_dtype(plan, config))
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
    work = summary.get("extrapolated_entries")
    if work is not None:
        flops_text = f" ({work['flops'] / full_run:.2%} of full compute's FLOPs)" if flops is not None else ""
        print(
            f"extrapolation: {work['steps']} step-cached steps and {work['units']} unit reuses extrapolate, one lerp "
            f"each{second_order_text(work)}{flops_text}, counted in the ideal speedup"
        )
    if flops is not None:
        shape = ", ".join(f"{k} {v}" for k, v in summary["call_shape"].items())
        print(
            f"ideal speedup on {summary['model_config']} ({shape}): {summary['ideal_speedup']:.3f}x "
            f"(FLOPs executed: {summary['compute_fraction']:.1%} of full compute)"
        )
    if args.memory:
        stored = f"stored in {plan.cache_dtype} (the plan's cache_dtype)" if plan.cache_dtype else "model dtype"
        print(
            f"peak cache memory: {summary['peak_cache_bytes'] / 2**30:.3f} GiB, {stored} (keeping every unit output "
            f"and H of a step: {summary['all_outputs_bytes'] / 2**30:.3f} GiB)"
        )
        others = summary.get("peak_cache_bytes_by_cache_dtype")
        if others:
            print("  in another cache dtype: " + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in others.items()))
    return 0


def _memory_by_cache_dtype(plan, config) -> dict:
    """The plan's cache dtype, and its peak in each storage dtype (the footprint replay, which equals the engine's
    accounting; not for plans that extrapolate units or set no dtype can change)."""
    from ..cache_footprint import measure_footprint, peak_cache_bytes
    from .parsing import CACHE_DTYPES

    result = {"cache_dtype": plan.cache_dtype}
    if plan.unit_extrapolation is None:
        footprint = measure_footprint(config)
        result["peak_cache_bytes_by_cache_dtype"] = {d: peak_cache_bytes(plan, footprint, d) for d in CACHE_DTYPES}
    return result


def fit_memory(args) -> int:
    from ..cache_footprint import measure_footprint
    from ..flops import profile_flops
    from ..memory_fit import fit_memory as fit
    from ..memory_fit import parse_size

    bound = parse_size(args.max_cache_memory)
    if not args.time_limit > 0:
        raise ValueError(f"--time-limit must be a number of seconds > 0, got {args.time_limit}.")
    plan = CachePlan.load(args.plan)
    config = _inspected_config(args)
    if config is None:
        raise ValueError("fit-memory needs --model-config or --model (the shapes the cache memory depends on).")
    flops = profile_flops(config)
    step_reuse = args.allow_step_reuse
    if step_reuse is not None and not 0 < step_reuse <= 1:
        raise ValueError(f"--allow-step-reuse takes a fraction in (0, 1] of a step's unit FLOPs, got {step_reuse}.")
    fitted = fit(plan, measure_footprint(config), flops, bound, args.cache_dtype, args.time_limit, step_reuse)
    fitted.save(args.output)
    fit_record = fitted.provenance.get("memory_fit")
    if fitted is plan or fit_record is None:
        print(
            f"wrote {args.output}: the plan keeps at most {bound} bytes of cache on {config.name} (stored in "
            f"{fitted.cache_dtype or config.dtype}); no reuse dropped"
        )
        return 0
    speed, peak = fit_record["ideal_speedup"], fit_record["peak_cache_bytes"]
    quality = (
        "optimal" if fit_record["optimal"] else f"stopped at the time limit, at most {speed['bound']:.3f}x possible"
    )
    print(
        f"wrote {args.output}: peak cache {peak['before'] / 2**30:.3f} -> {peak['after'] / 2**30:.3f} GiB "
        f"(stored in {fitted.cache_dtype or config.dtype}) "
        f"(bound {bound / 2**30:.3f} GiB), ideal speedup {speed['before']:.3f}x -> {speed['after']:.3f}x on "
        f"{config.name}, {fit_record['reuses_dropped']} reuses computed instead"
        f"{_steps_reused(fit_record)} ({quality})"
    )
    return 0


def _steps_reused(fit_record: dict) -> str:
    steps = fit_record.get("step_reuse", {}).get("converted")
    return f", steps {', '.join(map(str, steps))} reused whole" if steps else ""


SHAPE_OPTIONS = ("image_tokens", "text_tokens", "batch", "dtype")


def _inspected_config(args):
    """The model config of ``inspect``: named, a config.json (whose assumed call shape is logged), or a bundled
    model's; ``--image-tokens`` etc. override its call shape."""
    import dataclasses

    from ..model_configs import MODEL_CONFIGS, get_model_config

    overrides = {k: getattr(args, k) for k in SHAPE_OPTIONS if getattr(args, k) is not None}
    own = args.pipeline or args.transformer
    if sum(bool(x) for x in (args.model, own, args.model_config)) > 1:
        raise ValueError("Give one of --model NAME (a bundled model), --pipeline / --transformer, --model-config.")
    if args.model:
        from ..models import registry

        config = registry.get(args.model).model_config()
    elif args.model_config or own:
        from ..models.sources import ModelSource

        source = ModelSource(None, args.pipeline, args.transformer) if own else None
        path = args.model_config or str(source.transformer_config())
        config = get_model_config(path)
        if source is not None:
            config = dataclasses.replace(config, name=source.name)
        if path not in MODEL_CONFIGS and not set(overrides) >= {"image_tokens", "dtype"}:
            assumed = ", ".join(f"{k} {v}" for k, v in _call_shape(config).items() if k not in overrides)
            print(
                f"invardiff inspect: note: {path} gives no call shape; assumed the {config.family} family's "
                f"defaults: {assumed} (the dtype of the weights beside it, if any; set --image-tokens, "
                "--text-tokens, --batch, --dtype to match your runs)",
                file=sys.stderr,
            )
    else:
        if overrides:
            raise ValueError(f"--{next(iter(overrides)).replace('_', '-')} needs --model-config or --model.")
        return None
    return dataclasses.replace(config, **overrides)


def _call_shape(config) -> dict:
    return {k: getattr(config, k) for k in SHAPE_OPTIONS}


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

    _use_threads(args)
    from .search_commands import calibrate_budget, refuse_memory_options, wants_search

    refuse_memory_options(args)
    runs = _calibration_runs(args)  # bad inputs fail before the model loads
    pipe, family, entry = _load_pipeline(args)
    thresholds = None if wants_search(args) else _thresholds(args, family, default=True)
    steps = args.steps or (entry.num_inference_steps if entry else None)
    if steps is None:
        raise ValueError("calibrate needs --steps N (the plan's num_inference_steps).")
    extra = {
        "height": args.height,
        "width": args.width,
        "guidance_scale": args.guidance_scale,
        "max_sequence_length": args.max_sequence_length,
        "num_frames": args.num_frames,
    }
    if entry is not None and args.guidance_scale is None:
        from ..families import get_family

        # A bundled model calibrates at its sampling guidance, unless its family's official threshold calibration
        # fixes one; the budgeted search records the calls its plans will run, at the sampling guidance (as the
        # library's calibrate_budget and the sweep do).
        if wants_search(args) or "guidance_scale" not in get_family(family).pipeline.calibration_kwargs:
            extra["guidance_scale"] = entry.guidance_scale
    extra = {k: v for k, v in extra.items() if v is not None}
    if entry is not None:  # a bundled video model's clip size and frame count
        extra = {**entry.pipeline_kwargs, **extra}
    if args.model_config:
        from ..families.model_config import video_pipeline_size
        from ..model_configs import get_model_config

        config = get_model_config(args.model_config)
        if "latent" in config.extra:  # a video config: its clip size, not the pipeline's default 81 frames of 480p
            extra = {**video_pipeline_size(config), **extra}
    if wants_search(args):  # --budget / --pareto: record trajectories, search plans (search_commands.py)
        return calibrate_budget(args, pipe, steps, runs, extra)
    if args.ray is not None:  # the same calibration, its runs recorded on Ray workers (invardiff.scale)
        from .scale import ray_calibration

        run_calibration = ray_calibration(args)
    else:
        from .scale import check_ray_options

        check_ray_options(args)
    with PhaseBars() as bars:
        plan, rates = run_calibration(
            pipe,
            num_inference_steps=steps,
            thresholds=thresholds,
            batch_size=args.batch_size,
            memory_budget=None if args.memory_budget_gib is None else int(args.memory_budget_gib * 2**30),
            offload=args.offload,
            pipeline_kwargs=extra,
            progress=bars.update,
            **runs,
        )
    if args.latents:  # the library records each run's latents by hash; the file they came from is the CLI's to say
        plan.provenance["calibration"]["latents_file"] = rates.provenance["latents_file"] = str(args.latents)
    plan.save(args.output)
    if isinstance(rates, dict):  # a pipeline with experts (Wan2.2): one plan and one rates file per expert
        paths = {name: rates_path_for(args.output, name) for name in rates}
        for name, path in paths.items():
            rates[name].save(path)
        cached = ", ".join(f"{name} {_step_cached(plan[name])}" for name in plan)
        written = ", ".join(str(path) for path in paths.values())
        print(f"wrote {args.output} (one plan per expert; steps step-cached: {cached}) and {written}")
        return 0
    rates_path = rates_path_for(args.output)
    rates.save(rates_path)
    print(f"wrote {args.output} ({_step_cached(plan)} steps step-cached) and {rates_path} ({rates.num_runs} runs)")
    return 0


def _step_cached(plan) -> str:
    return f"{int(plan.step_cache.sum())}/{plan.num_inference_steps}"


def _calibration_runs(args) -> dict:
    """``calibrate``'s runs as keyword arguments of the library: inputs with seeds, explicit cases, or inputs with
    the latents of a file (one per input, in order)."""
    if args.latents:
        if args.cases or args.seeds is not None:
            raise ValueError("--latents replaces the seeds: give the inputs with --prompts or --classes, not "
                             "--cases or --seeds.")  # fmt: skip
        items = read_prompts(args.prompts) if args.prompts else int_list(args.classes, "--classes")
        latents = read_latents(args.latents)
        if len(latents) != len(items):
            raise ValueError(
                f"{args.latents} holds {len(latents)} latents for {len(items)} inputs; give one per input, in order."
            )
        return {"cases": list(zip(items, latents, strict=True))}
    runs = {"seed": args.seed} if args.seeds is None else {"seeds": int_list(args.seeds, "--seeds")}
    if args.cases:
        if args.seeds is not None:
            raise ValueError("--seeds does not apply with --cases (each case carries its seed).")
        return {"cases": read_cases(args.cases)}
    if args.prompts:
        return {**runs, "prompts": read_prompts(args.prompts)}
    return {**runs, "class_labels": int_list(args.classes, "--classes")}


def read_latents(path: str) -> list[torch.Tensor]:
    """The latents of a ``.pt`` file (a tensor ``(N, ...)`` or a list of N tensors, loaded with
    ``weights_only``) or a ``.safetensors`` file (one tensor ``(N, ...)``, any name): one tensor per run."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--latents {path}: no such file (expected a .pt or .safetensors file of latents).")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = list(load_file(str(file)).values())
        if len(tensors) != 1:
            raise ValueError(f"{path} holds {len(tensors)} tensors; expected one, of shape (runs, ...).")
        loaded = tensors[0]
    else:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    if torch.is_tensor(loaded):
        loaded = list(loaded.unbind(0))
    if not isinstance(loaded, (list, tuple)) or not loaded or not all(torch.is_tensor(t) for t in loaded):
        raise ValueError(f"{path}: expected a tensor (runs, ...) or a list of tensors, got {type(loaded).__name__}.")
    return list(loaded)


def resample_plan(args) -> int:
    from .search_commands import resample_plan as run

    return run(args)


class PhaseBars:
    """One progress bar per phase, opened when the phase starts (named after it, so the bar on screen is the phase
    in progress) and closed when it ends; ``update(phase, done, total)`` is a library progress callback."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.bar = None
        self.phase = None

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.bar = tqdm(total=total, desc=phase, disable=self.disable)
            self.phase = phase
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.phase = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_cases(path: str) -> list[tuple]:
    """(input, seed) pairs from a JSON list of ``{"input": ..., "seed": ...}`` objects (the demo report's
    ``cases``)."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f'{path} is not JSON ({error}); expected [{{"input": ..., "seed": 0}}, ...].') from None
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(c, dict) and set(c) == {"input", "seed"} for c in raw)
    ):
        raise ValueError(f'{path}: expected a non-empty JSON list of {{"input": ..., "seed": N}} objects.')
    if not all(isinstance(c["seed"], int) and isinstance(c["input"], (str, int)) for c in raw):
        raise ValueError(f"{path}: every seed must be an integer and every input a prompt or a class id.")
    return [(c["input"], c["seed"]) for c in raw]


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


def rates_path_for(plan_path: str, expert: str | None = None) -> Path:
    """Where calibrate writes the rates of ``plan_path`` (of one expert: ``PLAN.<expert>.rates.npz``)."""
    path = Path(plan_path)
    return path.with_name(path.stem + (f".{expert}" if expert else "") + ".rates.npz")


def _thresholds(args, family: str, default: bool = False):
    from ..calibration import parse_thresholds, preset
    from ..families import get_family

    if args.thresholds:
        return parse_thresholds(args.thresholds, family)
    if args.preset:
        return preset(family, args.preset)
    name = next(iter(get_family(family).presets), None) if default else None
    if name is None:
        raise ValueError("Give --preset NAME or --thresholds ... (see invardiff calibrate --help).")
    print(
        f"invardiff: no --preset or --thresholds given: the {family} family's default preset {name!r}", file=sys.stderr
    )
    return preset(family, name)


def _load_pipeline(args):
    """The pipeline to calibrate, its family name and, for a bundled model, its registry entry."""
    from ..families import resolve_family
    from ..models.sources import ModelSource

    device = check_device(args.device)
    entry = None
    if args.model_config:
        if args.model or args.pipeline or args.transformer:
            raise ValueError("Give --model-config (a random-weight toy) or a model (--model / --pipeline / "
                             "--transformer), not both.")  # fmt: skip
        from ..model_configs import get_model_config
        from ..toy_pipelines import build_pipeline

        config = get_model_config(args.model_config)
        pipe = build_pipeline(config, config.build_transformer(device), text_encoders=True)
    else:
        source = ModelSource.from_args(args)
        entry = source.bundled
        pipe = source.load(device)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, resolve_family(pipe.transformer).name, entry


def check_device(name: str) -> torch.device:
    """``name`` as a device this machine has, or a ValueError that says what it has."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error}); use cpu, cuda, cuda:1 or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device "
                "cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu.")
    return device


def _use_threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def bench_engine(args) -> int:
    from ..bench.engine import bench_family

    _use_threads(args)
    device = check_device(args.device)
    schedule = args.schedule or ("alternate" if device.type == "cuda" else "lockstep")
    from ..bench.plans import bench_plan_names, is_plan_file

    available = bench_plan_names()
    from .arguments import book_families

    books = args.books or _default_books(args.family or book_families(), args.config)
    unknown = sorted(book for book in set(books) - set(available) if not is_plan_file(book))
    if unknown:
        raise ValueError(f"Unknown books {unknown}; available: {sorted(available)}, or a plan file (PLAN.json).")
    if args.peers:
        if args.compile:
            raise ValueError("--compile is not available with --peers yet: the peers' hooks are not compiled here.")
        return _bench_engine_peers(args, device, books)

    def run(family: str, family_books: list[str], progress) -> list[dict]:
        return bench_family(
            family, args.config, family_books, device, args.rounds, schedule, progress, compile_blocks=args.compile
        )

    by_family = _books_by_family(books)  # --books name their own families; --family picks the default books
    results = _per_family(args, by_family, "bench-engine", run)
    stem = f"bench-engine-{args.config}-{device.type}" + ("-compiled" if args.compile else "")
    return _report(args, results, stem, [_public_fields(r) for r in results])


def _default_books(families: list[str], size: str) -> list[str]:
    from ..bench.plans import default_bench_plans

    books = []
    for family in families:
        reachable = default_bench_plans(family, size)
        left_out = [name for name in default_bench_plans(family) if name not in reachable]
        if not reachable:
            raise ValueError(f"No benchmark plan of {family} reaches its FLOP-ideal speedup on its {size} config.")
        if left_out:
            print(
                f"bench-engine: leaving out {', '.join(left_out)}: no plan reaches that FLOP-ideal speedup on the "
                f"{size} config of {family} (its reusable units are too small a share of its FLOPs)",
                file=sys.stderr,
            )
        books += reachable
    return books


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
    from ..bench.plans import plan_family

    by_family: dict[str, list[str]] = {}
    for book in books:
        by_family.setdefault(plan_family(book), []).append(book)
    return by_family


def _per_family(args, by_family: dict[str, list[str]], label: str, run) -> list[dict]:
    """``run(family, books, progress)`` for each family, with a progress bar over its rounds."""
    results = []
    for family, family_books in by_family.items():
        with tqdm(total=args.rounds + 1, desc=f"{label} {family}", disable=args.json) as bar:
            # a message names the round in progress; None: that round finished
            results += run(
                family,
                family_books,
                lambda message: bar.update(1) if message is None else bar.set_postfix_str(message),
            )
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
    from ..calibration.run import check_inputs
    from ..models.sources import ModelSource
    from .policy_args import chosen_policy, planned_steps, policy_config
    from .scale import check_ray_options, generate_many, wants_many

    check_ray_options(args)
    source = ModelSource.from_args(args)
    if wants_many(args):  # --prompts / --classes / --ray: one image per (input, seed), with a manifest
        return generate_many(args)
    bundled = source.bundled
    if bundled is not None:  # a bundled model's input kind and the plan's family are checked before loading it
        _check_item_kind(args, source.name, bundled.inputs)
        config = policy_config(args, bundled.family)
    pipe = source.load()
    if bundled is None:
        from ..families import resolve_family

        config = policy_config(args, resolve_family(pipe.transformer).name)
    entry = source.sampling(pipe, planned_steps(args, config), args.guidance)
    _check_item_kind(args, source.name, entry.inputs)
    steps = entry.num_inference_steps
    policy = chosen_policy(args)
    out = Path(args.output)
    suffix = f"-{policy.replace('+', '-')}" if policy else ""
    extension = ".gif" if entry.video else ".png"  # a video model writes each clip as an animated GIF
    paths = [out / f"{source.name}-seed{args.seed + index}{suffix}{extension}" for index in range(args.batch)]
    summary_path = out / f"{source.name}-seed{args.seed}{suffix}.summary.json"
    existing = [str(path) for path in [*paths, summary_path] if path.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or another -o DIR.")
    item = args.prompt if args.prompt is not None else args.class_id
    check_inputs(pipe, entry.family, [item])
    if config is not None:
        api.enable(pipe, config)
    try:
        kwargs = entry.call_kwargs(item, args.seed, batch=args.batch, num_inference_steps=steps, output_type="np")
        result = pipe(**kwargs)
        images = result.frames if entry.video else result.images
        summary = api.summary(pipe).to_dict() if config is not None else None
    finally:
        if config is not None:
            api.disable(pipe)
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty directory
    for path, image in zip(paths, images, strict=True):
        if entry.video:  # (F, H, W, C) in [0, 1]
            from ..video_files import save_gif

            save_gif(torch.from_numpy(np.asarray(image)).permute(0, 3, 1, 2), path)
            continue
        array = (np.asarray(image) * 255).round().astype(np.uint8)
        with atomic_path(path) as temporary:
            Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(temporary)
    if summary is not None:
        write_text(summary_path, json.dumps(summary, indent=1) + "\n")
    print(f"wrote {', '.join(map(str, paths))}" + (f" and {summary_path}" if summary is not None else ""))
    return 0


def _check_item_kind(args, name: str, kind: str) -> None:
    if (kind == "prompt") != (args.prompt is not None):
        raise ValueError(f"{name} takes {'--prompt TEXT' if kind == 'prompt' else '--class N'}.")


def demo(args) -> int:
    from ..calibration import preset
    from ..demo import run_demo, write_report
    from ..families import get_family
    from ..models.sources import ModelSource

    _use_threads(args)
    device = check_device(args.device)
    seeds = int_list(args.seeds, "--seeds")
    source = ModelSource.from_args(args, default_model="flux-shapes")
    if source.model is not None:
        given = [f"--{k.replace('_', '-')}" for k in OWN_MODEL_OPTIONS if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to your own model (--pipeline / --transformer).")
        preset(source.bundled.family, args.preset or source.bundled.demo_preset)  # a bad preset fails now
    target = _own_target(args, source, str(device))
    # a bundled model's demo preset; your own model's: its family's default (the first)
    preset_name = args.preset or (
        target.entry.demo_preset if source.model else next(iter(get_family(target.family).presets), None)
    )
    if preset_name is None:
        raise ValueError(f"The {target.family} family has no preset: the demo needs one (--preset NAME).")
    preset(target.family, preset_name)
    # Phases differ widely in length (calibration is two passes), so the bar shows elapsed time and no ETA.
    with tqdm(total=args.rounds + 3, desc=f"demo {source.name}", disable=args.json, bar_format=PHASE_BAR) as bar:

        def progress(phase: str, done: int) -> None:
            bar.n = done
            bar.set_postfix_str(phase)  # the phase in progress

        report, images = run_demo(target, preset_name, seeds, args.rounds, device=str(device), progress=progress)
        bar.n = bar.total
        bar.set_postfix_str("done")
    paths = write_report(report, images, Path(args.out))
    if args.json:
        print(json.dumps(report))
    else:
        print(paths["markdown"].read_text())
        print(
            f"wrote {', '.join(str(p) for p in paths.values())}, {Path(args.out) / 'plan.json'} and "
            f"{Path(args.out) / 'plan.rates.npz'}"
        )
    return 0


PHASE_BAR = "{desc}: {n}/{total} phases done, {elapsed} elapsed{postfix}"

# `demo` and `bench` options that describe your own model (a bundled model has its own inputs and settings).
OWN_MODEL_OPTIONS = ("prompts", "classes", "steps", "guidance", "calibration_cases")


def _own_target(args, source, device: str, cases: list[tuple] | None = None):
    """The sweep / demo target of ``source``: a bundled model as it is, or your own model with the evaluated inputs
    (``--prompts``, ``--classes`` or the cases' inputs), ``--steps``, ``--guidance`` and ``--calibration-cases``."""
    from ..bench.targets import source_target

    if source.model is not None:
        return source_target(source, device=device)
    if sum(bool(x) for x in (args.prompts, args.classes, cases)) != 1:
        raise ValueError(
            "Your own model needs one of --prompts FILE (Flux, Wan), --classes 1,2,3 (DiT), --cases FILE."
        )
    items = (
        read_prompts(args.prompts)
        if args.prompts
        else int_list(args.classes, "--classes")
        if args.classes
        else list(dict.fromkeys(item for item, _ in cases))
    )
    if not args.steps:
        raise ValueError("Your own model needs --steps N (the sampling step count).")
    calibration = read_cases(args.calibration_cases) if args.calibration_cases else None
    return source_target(source, items, args.steps, args.guidance, device, calibration)


def _quiet_cache_dit() -> None:
    # cache-dit logs every enable_cache on stdout (INFO and WARNING), which would interleave with the progress bars
    # and break --json; it reads its level once, at import. A level the user set is kept.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")


def bench(args) -> int:
    _quiet_cache_dit()
    from datetime import datetime, timezone

    from ..bench.bundled import comparison_speedups, sweep_evaluation, sweep_inputs, sweep_name
    from ..bench.sweep_report import equal_speed_table, markdown_table, plot_pareto, run_record
    from ..bench.targets import source_target
    from ..models.sources import ModelSource

    _use_threads(args)
    device = str(check_device(args.device))
    seeds = int_list(args.seeds, "--seeds")
    cases = read_cases(args.cases) if args.cases else None
    if args.pipeline or args.transformer:
        if args.model:
            raise ValueError("Give bundled --model NAME(s) or your own --pipeline / --transformer, not both.")
        targets = [_own_target(args, ModelSource(None, args.pipeline, args.transformer), device, cases)]
    else:
        own_only = [k for k in OWN_MODEL_OPTIONS if k != "steps"]  # a bundled model's few-step sweep takes --steps
        given = [f"--{k.replace('_', '-')}" for k in own_only if getattr(args, k) is not None]
        if given or cases:
            raise ValueError(f"{', '.join(given) or '--cases'} applies only to your own --pipeline / --transformer.")
        targets = [
            source_target(ModelSource(model), num_inference_steps=args.steps, device=device)
            for model in args.model or BENCH_MODELS
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for target in targets:
        # A bundled model at another step count than its own is another sweep: its files say the count.
        few_step = args.steps is not None and not (args.pipeline or args.transformer)
        model = sweep_name(target.name, args.steps if few_step else None)
        jsonl = out / f"sweep-{model}.jsonl"
        inputs = sweep_inputs(target, seeds, device, cases, args.batch)
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "device": _device_name(torch.device(args.device)),
            "threads": torch.get_num_threads(),
            "images": len(inputs.cases),
            "rounds": args.rounds,
        }
        if not args.report_only:  # each new point records this run: a resumed file says which run measured what
            command = shlex.join(["invardiff", *args.argv])
            run = run_record(meta, command, sweep_evaluation(target, inputs, args.batch))
            results = _run_bench(args, target, inputs, jsonl, run)
        if args.report_only or args.resume:  # the report covers every point of the file, kept ones included
            results = read_json_lines(jsonl)
        speedups = comparison_speedups(target.entry.num_inference_steps)
        table = "\n".join(
            [
                markdown_table(model, results, meta),
                equal_speed_table(model, results, speedups),
                equal_speed_table(model, results, speedups, speed="ideal_speedup"),
            ]
        )
        from ..bench.extrapolation_cost import sweep_note

        table += sweep_note(model, results)  # extrapolating points: what a lerp costs beside plain reuse
        if args.ray is not None:  # how the timing was distributed (invardiff.scale.bench)
            from ..scale.bench import TIMING_NOTE

            table += "\n" + TIMING_NOTE.format(workers=args.workers) + "\n"
        write_text(out / f"sweep-{model}.md", table)
        plot_pareto(model, results, out / f"sweep-{model}.png")
        print(table)
        print(f"wrote {jsonl}, {out / f'sweep-{model}.md'} and {out / f'sweep-{model}.png'}")
    return 0


BENCH_MODELS = ("flux-shapes", "dit-digits")  # `bench` without a model


def _device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def _run_bench(args, target, inputs, jsonl: Path, run: dict) -> list[dict]:
    from ..bench.bundled import DEFAULT_METHODS, sweep_points
    from ..bench.extrapolation_cost import entry_costs, extrapolated_count
    from ..bench.points import peer_points, save_point_plan
    from ..bench.sweep import run_sweep
    from ..bench.sweep_report import append_jsonl, check_resumable

    done = {}
    if args.resume and jsonl.exists():
        done = {r["label"]: r for r in read_json_lines(jsonl)}
        check_resumable(list(done.values()), run["evaluation"], jsonl)  # before any calibration
    else:
        jsonl.unlink(missing_ok=True)
    with tqdm(desc=f"{target.name}: calibrating", total=None) as bar:
        methods = tuple(args.methods or DEFAULT_METHODS)
        points = sweep_points(target, methods, lambda message: bar.set_postfix_str(message), peer_points)
    plans = {point.label: point.plan for point in points if point.plan is not None}
    costs = None  # what one extrapolated entry costs, measured once by this run at its first extrapolating point
    with tqdm(total=len(points), desc=f"{target.name}: sweep") as bar:
        bar.update(sum(point.label in done for point in points))  # the kept points of this run's methods

        def on_result(result):
            nonlocal costs
            if extrapolated_count(result):  # for the report's note on extrapolating points
                costs = costs or entry_costs(target, inputs.device)
                result["entry_costs"] = costs
            result["run"] = run
            if result["label"] in plans:  # the plan beside the results: OUT/plans/sweep-MODEL/LABEL.json
                path = save_point_plan(plans[result["label"]], jsonl.parent / "plans" / jsonl.stem, result["label"])
                result["plan_file"] = path.relative_to(jsonl.parent).as_posix()
            append_jsonl(result, jsonl)
            bar.set_postfix_str(result["label"])
            bar.update(1)

        if args.ray is not None:  # the points spread over Ray workers (cli/scale.py)
            from .scale import ray_sweep

            return ray_sweep(args, inputs, points, on_result, done)
        from .scale import check_ray_options

        check_ray_options(args)
        return run_sweep(inputs, points, args.rounds, on_result, done)
