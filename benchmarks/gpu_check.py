"""GPU figures at real model sizes in one command: the engine benchmark's loop (``invardiff bench-engine``) at
FLUX.1-dev / DiT-XL/2 / Wan2.1-1.3B / HunyuanVideo configs, random weights, bf16, with what only a GPU can measure.

    python benchmarks/gpu_check.py --out DIR              # on a CUDA device (benchmarks/gpu_check.sh wraps it)
    python benchmarks/gpu_check.py --dry-run --out DIR    # the whole script on the CPU at tiny widths (~1 min CPU)
    python benchmarks/gpu_check.py --plan-only            # the time plan from FLOP counts; runs no model

Sections, in order of importance (each writes DIR/gpu-check[-dry-run].{json,md} when it ends, so a kill leaves the
finished ones; a section that does not fit the time left, by its FLOP-counted estimate, is skipped with the reason):

* ``flux`` / ``dit``: every official book (``bench_family``, alternating whole runs on one transformer on CUDA),
  plus per variant the peak cache memory measured (``max_memory_allocated`` of its run less full compute's) against
  the meta-device estimate (``invardiff.memory.cache_memory``) and host syncs per step
  (``torch.cuda.set_sync_debug_mode("warn")``, ``invardiff.bench.device_measures``);
* ``flux-compiled``: the Fast book and FirstBlockCache, each over full compute, all under regional compilation
  (``compile_repeated_blocks``; ``engine_peers.run_variants``);
* ``wan``: Wan2.1-1.3B at 480p with a reduced frame count, the synthetic 2x / 3x plans, and DiCache's official
  ``wan2.1`` preset against full compute; ``hunyuanvideo``: HunyuanVideo at a reduced size, synthetic plans;
* ``flux-peers``: the Fast book beside one setting of each peer (``engine_peers.bench_peers``).

The FLUX section checks the acceptance figures (Fast book >= 3.4x, efficiency >= 0.95 for every book,
reuse-nothing overhead <= 1%, at most one host sync per step added by the engine, peak cache memory within 5% of
the estimate); where one falls short, the profiler summary of one run of that variant and of full compute is in
the report. On the CPU (``--dry-run``) CUDA-only figures read "n/a (CPU dry run)" and no check is an acceptance
figure; the Fast book is profiled regardless, so that the dry run goes through every path.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch


os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # cache-dit logs every enable_cache at INFO; read at import

from invardiff._version import __version__  # noqa: E402
from invardiff.bench.device_measures import instrumenter, measured_fields, profile_summary  # noqa: E402
from invardiff.bench.engine import bench_family  # noqa: E402
from invardiff.bench.engine_peers import bench_peers, book_variant, peer_variant, policy_variant, run_variants  # noqa: E402
from invardiff.bench.plans import bench_plan, default_bench_plans  # noqa: E402
from invardiff.dicache import DiCacheConfig  # noqa: E402
from invardiff.families import get_family  # noqa: E402
from invardiff.families.model_config import ModelConfig, video_fields  # noqa: E402
from invardiff.flops import profile_flops  # noqa: E402
from invardiff.memory import cache_memory  # noqa: E402
from invardiff.model_configs import MODEL_CONFIGS  # noqa: E402
from invardiff.stats import ideal_speedup  # noqa: E402


NA_CPU = "n/a (CPU dry run)"
# The time plan: H100 dense bf16 matmuls reach ~800 TFLOP/s on large products (KINDS.md); a diffusers
# transformer's eager forward, with its attention, norms and launches, about half of that. Estimates divide by
# MARGIN on top, until the first section measures the device's own rate (then MEASURED_MARGIN).
ASSUMED_FLOPS_PER_S = 400e12
MARGIN = 1.5
MEASURED_MARGIN = 1.2
CALL_OVERHEAD_S = 0.01  # per transformer call: kernel launches of an eager forward (DiT-XL/2 is launch-bound)
# Regional inductor compilation of FLUX's two block classes, with the recompiles that the engine's unit modes and
# FirstBlockCache's hooks cause: a guess (tens of seconds), checked by the first GPU run's section times.
COMPILE_S = 60.0
# The meta-device memory estimates (cache_memory: ~8 s of one core per FLUX plan, whatever the width) run in worker
# processes from the start, beside the device's work, so they take none of its time.
ESTIMATE_WORKERS = 4
ESTIMATE_TIMEOUT_S = 900.0  # a wait for one estimate; HunyuanVideo's, the slowest, takes ~15 s of one core

# Video sizes that fit the time: Wan2.1-1.3B at 832x480 with 9 frames (latent 3 x 60 x 104, 4680 tokens) instead
# of 81; HunyuanVideo at 480x272 with 9 frames (latent 3 x 34 x 60, 1530 tokens) instead of 960x544, 129 frames.
WAN_LATENT = (3, 60, 104)
HUNYUAN_LATENT = (3, 34, 60)
DRY_VIDEO_STEPS = 20  # a 3x synthetic plan needs 20 on the 2-block HunyuanVideo (steps 0-2 and the last compute)
# One setting of each peer, at the fast end on random weights (bench/peers.py's loop settings); the expected
# fraction of a full run each takes, for the time plan, is what the CPU loop measured (README, Benchmarks).
PEER_SETTINGS = {
    "diffusers-fbcache": (0.6,),
    "diffusers-magcache": (0.12,),
    "diffusers-taylorseer": (5,),
    "cache-dit": (0.8,),
}
PEER_RUN_FRACTIONS = {
    "diffusers-fbcache": 0.15,
    "diffusers-magcache": 0.4,
    "diffusers-taylorseer": 0.8,
    "cache-dit": 0.3,
}
COMPILED_FBCACHE = 0.6
ACCEPTANCE = {"fast_speedup": 3.4, "efficiency": 0.95, "overhead": 0.01, "syncs_per_step": 1.0, "memory": 0.05}


# ----- configs ---------------------------------------------------------------------------------------------------
def configs(dry_run: bool) -> dict[str, ModelConfig]:
    """The model config of each family: the real ones (reduced video sizes) or, dry, the tiny full-depth ones
    (the official books need the real depth) and 2-block video configs over fewer steps. ``flux-loop`` is the
    config of the compiled and peer sections, which the dry run runs on a 2+4-block FLUX (:data:`LOOP_BOOK`)."""
    if dry_run:
        return {
            "flux": MODEL_CONFIGS["flux-tiny-fulldepth"],
            "flux-loop": MODEL_CONFIGS["flux-tiny"],
            "dit": MODEL_CONFIGS["dit-tiny-fulldepth"],
            "wan": _steps(MODEL_CONFIGS["wan-tiny"], DRY_VIDEO_STEPS),
            "hunyuanvideo": _steps(MODEL_CONFIGS["hunyuanvideo-tiny"], DRY_VIDEO_STEPS),
        }
    return {
        "flux": MODEL_CONFIGS["flux1-dev"],
        "flux-loop": MODEL_CONFIGS["flux1-dev"],
        "dit": MODEL_CONFIGS["dit-xl-2"],
        "wan": _latent(MODEL_CONFIGS["wan2.1-1.3b"], WAN_LATENT, "Wan2.1-1.3B at 832x480, 9 frames"),
        "hunyuanvideo": _latent(MODEL_CONFIGS["hunyuanvideo"], HUNYUAN_LATENT, "HunyuanVideo at 480x272, 9 frames"),
    }


def _steps(config: ModelConfig, steps: int) -> ModelConfig:
    return dataclasses.replace(config, name=f"{config.name}-{steps}steps", steps=steps)


def _latent(config: ModelConfig, latent: tuple[int, int, int], description: str) -> ModelConfig:
    name = f"{config.name}-{'x'.join(map(str, latent))}"
    return dataclasses.replace(config, name=name, description=description, **video_fields(latent))


# ----- time plan and budget --------------------------------------------------------------------------------------
class Budget:
    """Seconds left of ``total_s`` since construction; FLOP counts turn into seconds at ``flops_per_s``."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.total_s = total_s
        self.clock = clock
        self.started = clock()
        self.flops_per_s = ASSUMED_FLOPS_PER_S / MARGIN
        self.rate_source = f"assumed {ASSUMED_FLOPS_PER_S / 1e12:.0f} TFLOP/s / margin {MARGIN}"

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def seconds(self, work: Work) -> float:
        return work.flops / self.flops_per_s + work.calls * CALL_OVERHEAD_S + work.fixed_s

    def refusal(self, work: Work) -> str | None:
        """Why ``work`` is not started (its estimate exceeds the time left), or None."""
        needed, left = self.seconds(work), self.left()
        if needed <= left:
            return None
        return (
            f"needs ~{needed:.0f} s by its FLOP-counted estimate ({self.rate_source}), {max(left, 0):.0f} s left of "
            f"the {self.total_s:.0f} s budget"
        )

    def measured(self, flops_per_run: float, seconds_per_run: float) -> None:
        """Use the device's own rate from now on: full compute's FLOPs over its median seconds."""
        rate = flops_per_run / seconds_per_run
        self.flops_per_s = rate / MEASURED_MARGIN
        self.rate_source = f"measured {rate / 1e12:.3g} TFLOP/s / margin {MEASURED_MARGIN}"


@dataclasses.dataclass
class Work:
    flops: float = 0.0
    calls: int = 0
    fixed_s: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.calls + other.calls, self.fixed_s + other.fixed_s)


_CACHE: dict = {}


def flops_of(config: ModelConfig):
    """``profile_flops(config)``, once per config (seconds each at the real sizes)."""
    key = ("flops", config.name)
    if key not in _CACHE:
        _CACHE[key] = profile_flops(config)
    return _CACHE[key]


def plan_of(book: str, config: ModelConfig):
    """``bench_plan(book, config)``, once per book and config (a synthetic plan profiles the config)."""
    key = ("plan", book, config.name)
    if key not in _CACHE:
        _CACHE[key] = bench_plan(book, config)
    return _CACHE[key]


def runs(config: ModelConfig, fractions: list[float], count: int = 1) -> Work:
    """``count`` runs of each variant, variant ``i`` taking ``fractions[i]`` of a full run's FLOPs."""
    full = flops_of(config).full_step * config.steps
    return Work(full * sum(fractions) * count, config.steps * len(fractions) * count)


def plan_fractions(config: ModelConfig, books: list[str]) -> list[float]:
    return [1.0 / ideal_speedup(plan_of(book, config), flops_of(config)) for book in books]


# ----- sections --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    device: torch.device
    dry_run: bool
    rounds: int
    schedule: str
    configs: dict[str, ModelConfig]
    budget: Budget
    estimates: dict = dataclasses.field(default_factory=dict)  # (family, book): Future of its estimated bytes

    @property
    def warmup_rounds(self) -> int:
        return 0 if self.dry_run else 1  # dry: the figures do not matter, the paths do

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# The plan of the compiled and peer sections: the Fast book; dry, a synthetic 3x plan on the 2+4-block FLUX (the
# dry run's Dynamo traces and peer runs would take minutes at full depth on a small CPU).
LOOP_BOOK = {False: "flux/fast", True: "flux/synthetic-3x"}
# The dry run's books: one per family (a run of the tiny full-depth FLUX takes ~1 s of one core, its meta-device
# memory estimate ~8 s), so that the whole dry run stays near a minute of CPU time.
DRY_BOOKS = {"flux": ["flux/fast"], "dit": ["dit/fast"]}


def estimated_peak_cache_bytes(book: str, config: ModelConfig) -> int:
    """The meta-device estimate of ``book``'s peak cache bytes on ``config`` (run in a worker process)."""
    return cache_memory(plan_of(book, config), config)["peak_cache_bytes"]


def start_estimates(check: Check, sections: list[str], workers: int) -> ProcessPoolExecutor:
    """Submit the memory estimate of every book of the engine sections to a pool of ``workers`` processes."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    for family in [name for name in sections if name in ENGINE_FAMILIES]:
        for book in books_of(family, check):
            check.estimates[(family, book)] = pool.submit(estimated_peak_cache_bytes, book, check.configs[family])
    return pool


def books_of(family: str, check: Check) -> list[str]:
    if family not in ("flux", "dit"):
        return [f"{family}/synthetic-2x", f"{family}/synthetic-3x"]
    return DRY_BOOKS[family] if check.dry_run else default_bench_plans(family)


def engine_work(family: str, check: Check) -> Work:
    config, books = check.configs[family], books_of(family, check)
    fractions = [1.0, 1.0, *plan_fractions(config, books)]  # stock, reuse-nothing, books
    return runs(config, fractions, check.warmup_rounds + check.rounds)


def engine_section(family: str, check: Check) -> dict:
    """``bench_family`` on the family's books, with device measurements and the meta-device memory estimate."""
    config = check.configs[family]
    books = books_of(family, check)
    measured = {}
    section = {"model_config": config.name, "description": config.description, "books": books, "profiles": {}}
    measure = check.cuda and check.schedule == "alternate"

    def on_results(results: list[dict], variants: dict) -> None:
        steps = results[0]["num_steps"]
        rows = [_reuse_nothing_row(results[0])] + results
        for row in rows:
            name = "reuse_nothing" if row["book"] == "reuse-nothing" else row["book"]
            estimate = (
                0 if name == "reuse_nothing" else check.estimates[(family, name)].result(timeout=ESTIMATE_TIMEOUT_S)
            )
            row["estimated_peak_cache_bytes"] = estimate
            if measure:
                row.update(measured_fields({n: m.last for n, m in measured.items()}, name, steps, estimate))
            else:
                why = NA_CPU if not check.cuda else "n/a (lockstep: every variant's cache is resident)"
                row.update({key: why for key in MEASURED_KEYS})
        section["rows"] = rows
        if family == "flux":  # compute-bound, unlike DiT-XL/2: its rate is the one to plan the rest with
            check.budget.measured(flops_of(config).full_step * steps, results[0]["median_seconds"]["stock"])
            section["acceptance"] = acceptance(rows, check)
            section["profiles"] = profiles(rows, section["acceptance"], variants, measured, steps, check)

    bench_family(
        family,
        "full",
        books,
        check.device,
        check.rounds,
        check.schedule,
        config=config,
        instrument=instrumenter(check.device, measured) if measure else None,
        on_results=on_results,
        warmup_rounds=check.warmup_rounds,
    )
    return section


MEASURED_KEYS = (
    "measured_peak_cache_bytes",
    "measured_held_cache_bytes",
    "memory_vs_estimate",
    "host_syncs_per_step",
    "stock_host_syncs_per_step",
    "added_host_syncs_per_step",
    "host_sync_sites",
)


def _reuse_nothing_row(first: dict) -> dict:
    """The reuse-nothing plan's row: the engine with every unit computed, against stock (ideal 1)."""
    seconds = first["median_seconds"]
    return {
        "book": "reuse-nothing",
        "model_config": first["model_config"],
        "dtype": first["dtype"],
        "num_steps": first["num_steps"],
        "rounds": first["rounds"],
        "schedule": first["schedule"],
        "measured_speedup": 1.0 / (1.0 + first["overhead"]),
        "ideal_speedup": 1.0,
        "efficiency": 1.0 / (1.0 + first["overhead"]),
        "overhead": first["overhead"],
        "median_seconds": {"stock": seconds["stock"], "reuse_nothing": seconds["reuse_nothing"]},
    }


def acceptance(rows: list[dict], check: Check) -> list[dict]:
    """The FLUX acceptance checks: one dict each, ``passed`` None where the figure is not measured here."""
    books = [r for r in rows if r["book"] != "reuse-nothing"]
    nothing = rows[0]
    fast = next(r for r in books if r["book"] == "flux/fast")
    items = [("flux/fast", "measured speedup", fast["measured_speedup"], ">=", ACCEPTANCE["fast_speedup"])]
    items += [(r["book"], "efficiency", r["efficiency"], ">=", ACCEPTANCE["efficiency"]) for r in books]
    items.append(("reuse-nothing", "overhead", nothing["overhead"], "<=", ACCEPTANCE["overhead"]))
    items += [(r["book"], "added host syncs per step", r["added_host_syncs_per_step"], "<=", 1.0) for r in rows]
    items += [(r["book"], "|peak cache / estimate - 1|", _abs(r["memory_vs_estimate"]), "<=", 0.05) for r in books]
    note = "dry run: tiny CPU config, not an acceptance figure" if check.dry_run else ""
    checks = []
    for variant, figure, value, op, threshold in items:
        measured = isinstance(value, (int, float))
        passed = (value >= threshold if op == ">=" else value <= threshold) if measured else None
        checks.append(
            {
                "variant": variant,
                "figure": figure,
                "value": value,
                "threshold": f"{op} {threshold:g}",
                "passed": passed,
            }
            | ({"note": note} if note and measured else {})
        )
    return checks


def _abs(value):
    return abs(value) if isinstance(value, (int, float)) else value


def profiles(rows, checks, variants, measured, steps: int, check: Check) -> dict[str, str]:
    """Profiler summaries of full compute and of each variant with a figure short of its check (dry: the Fast
    book regardless), as far as the budget allows."""
    short = [c["variant"] for c in checks if c["passed"] is False]
    names = list(dict.fromkeys(("reuse_nothing" if n == "reuse-nothing" else n) for n in short))
    names = ["stock", *names[:2]] if names else []
    if check.dry_run:  # tiny CPU figures say nothing; one profile goes through the path (the table takes seconds)
        names = ["flux/fast"]
    config = check.configs["flux"]
    out = {}
    for name in names:
        fraction = 1.0 if name in ("stock", "reuse_nothing") else 1.0 / _row(rows, name)["ideal_speedup"]
        refusal = check.budget.refusal(runs(config, [fraction]))
        if refusal:
            out[name] = f"not profiled: {refusal}"
            continue
        variant = measured[name].inner if name in measured else variants[name]
        out[name] = profile_summary(variant, steps, check.device)
    return out


def _row(rows: list[dict], book: str) -> dict:
    return next(r for r in rows if r["book"] == book)


def compiled_work(check: Check) -> Work:
    config = check.configs["flux-loop"]
    fractions = [1.0, *plan_fractions(config, [LOOP_BOOK[check.dry_run]]), PEER_RUN_FRACTIONS["diffusers-fbcache"]]
    compile_s = 0.0 if check.dry_run else COMPILE_S
    return runs(config, fractions, 1 + check.warmup_rounds + check.rounds) + Work(fixed_s=compile_s)


def compiled_section(check: Check) -> dict:
    """Fast book and FirstBlockCache over full compute, all three under ``compile_repeated_blocks``."""
    from invardiff.bench.peers import fbcache

    config, book = check.configs["flux-loop"], LOOP_BOOK[check.dry_run]
    plan = plan_of(book, config)
    stock = config.build_transformer(check.device)
    variants = [book_variant(book, plan), peer_variant(fbcache(COMPILED_FBCACHE))]
    # The dry run compiles with Dynamo alone: inductor's C++ builds would take minutes on a small CPU.
    options = {"backend": "eager"} if check.dry_run else {}
    steps = plan.num_inference_steps
    rows = run_variants(stock, config, variants, steps, check.device, check.rounds, None, options, check.warmup_rounds)
    return {"model_config": config.name, "compile_options": options or {"backend": "inductor"}, "rows": rows}


def wan_dicache_work(check: Check) -> Work:
    return runs(
        check.configs["wan"], [1.0, 0.5], 1 + check.warmup_rounds + check.rounds
    )  # DiCache's share of a run: a guess


def video_section(family: str, check: Check) -> dict:
    section = engine_section(family, check)
    if family != "wan":
        return section
    refusal = check.budget.refusal(wan_dicache_work(check))
    if refusal:
        section["dicache"] = {"status": "skipped", "reason": refusal}
        return section
    config = check.configs["wan"]
    preset = get_family("wan").dicache_preset
    policy = DiCacheConfig.preset(preset, num_inference_steps=config.steps)
    variant = policy_variant("dicache", f"DiCache preset {preset}", policy, {"preset": preset})
    stock = config.build_transformer(check.device)
    rows = run_variants(
        stock, config, [variant], config.steps, check.device, check.rounds, warmup_rounds=check.warmup_rounds
    )
    section["dicache"] = {"status": "done", "rows": rows}
    return section


def peers_work(check: Check) -> Work:
    config = check.configs["flux-loop"]
    fractions = [1.0, *plan_fractions(config, [LOOP_BOOK[check.dry_run]]), *PEER_RUN_FRACTIONS.values()]
    return runs(config, fractions, 1 + check.warmup_rounds + check.rounds) + runs(
        config, [1.0]
    )  # + MagCache's calibration run


def peers_section(check: Check) -> dict:
    config = check.configs["flux-loop"]
    rows = bench_peers(
        "flux",
        "full",
        [LOOP_BOOK[check.dry_run]],
        check.device,
        check.rounds,
        config=config,
        peer_settings=PEER_SETTINGS,
        warmup_rounds=check.warmup_rounds,
    )
    return {"model_config": config.name, "peer_settings": PEER_SETTINGS, "rows": rows}


ENGINE_FAMILIES = ("flux", "dit", "wan", "hunyuanvideo")  # the sections of bench_family, named by family
SECTIONS = {
    "flux": (lambda check: engine_work("flux", check), lambda check: engine_section("flux", check)),
    "dit": (lambda check: engine_work("dit", check), lambda check: engine_section("dit", check)),
    "flux-compiled": (compiled_work, compiled_section),
    "wan": (
        lambda check: engine_work("wan", check) + wan_dicache_work(check),
        lambda check: video_section("wan", check),
    ),
    "hunyuanvideo": (
        lambda check: engine_work("hunyuanvideo", check),
        lambda check: video_section("hunyuanvideo", check),
    ),
    "flux-peers": (peers_work, peers_section),
}


# ----- report ----------------------------------------------------------------------------------------------------
def environment(device: torch.device, dry_run: bool) -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "cache_dit": version("cache-dit"),
        "invardiff": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def write_report(report: dict, out: Path, stem: str) -> None:
    """``stem``.json and ``stem``.md in ``out``, each written to a temporary file and renamed into place."""
    _write_atomic(out / f"{stem}.json", json.dumps(report, indent=1, default=str) + "\n")
    try:
        text = markdown(report)
    except Exception:  # the JSON holds every figure: a bug in the table must not end the run
        failure = traceback.format_exc()
        text = f"# GPU check\n\nThe markdown report failed; the figures are in {stem}.json.\n\n```\n{failure}```\n"
    _write_atomic(out / f"{stem}.md", text)


def _write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as stream:
        stream.write(text)
    os.replace(stream.name, path)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check{' (CPU dry run: tiny configs, not GPU figures)' if env['dry_run'] else ''}",
        "",
        f"{env['date']}; device {env['device']}; torch {env['torch']} (CUDA {env['cuda']}); diffusers "
        f"{env['diffusers']}; cache-dit {env['cache_dit']}; invardiff {env['invardiff']}; Python {env['python']}. "
        f"Random weights, {report['rounds']} timed round(s) after {report['warmup_rounds']} warm-up round(s), "
        f"{report['schedule']} schedule; medians of "
        f"per-round ratios; ideal = FLOP ratio; efficiency = measured / ideal.",
        "",
        f"Time: {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget; load average at the start "
        f"{env['load_average'][0]:.1f} on {env['cpus']} CPUs.",
        "",
        "| section | status | estimate s | took s | CPU s | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["sections"].items():
        estimate, took, cpu = (_fmt(s.get(key), "{:.0f}") for key in ("estimate_s", "seconds", "cpu_seconds"))
        note = s.get("reason") or s.get("error", "")
        lines.append(f"| {name} | {s['status']} | {estimate} | {took} | {cpu} | {note} |")
    for name, s in report["sections"].items():
        if s["status"] != "done":
            continue
        lines += ["", f"## {name}: {s.get('model_config', '')}", ""]
        lines += _section_lines(name, s)
    return "\n".join(lines) + "\n"


def _section_lines(name: str, s: dict) -> list[str]:
    if "books" in s:
        lines = _engine_table(s["rows"])
        if s.get("dicache"):
            d = s["dicache"]
            lines += ["", "DiCache, official preset, against full compute:", ""]
            lines += _variant_table(d["rows"]) if d["status"] == "done" else [f"skipped: {d['reason']}"]
        if s.get("acceptance"):
            lines += ["", "| variant | figure | value | threshold | passed |", "|---|---|---|---|---|"]
            for c in s["acceptance"]:
                passed = {True: "yes", False: "**no**", None: "n/a"}[c["passed"]]
                lines.append(f"| {c['variant']} | {c['figure']} | {_fmt(c['value'])} | {c['threshold']} | {passed} |")
        for variant, table in s.get("profiles", {}).items():
            lines += ["", f"Profile of one run, {variant}:", "", "```", table.rstrip(), "```"]
        return lines
    return _variant_table(s["rows"])


def _engine_table(rows: list[dict]) -> list[str]:
    lines = [
        "| plan | measured | ideal | efficiency | overhead | est. peak cache | measured peak cache "
        "| held between steps | vs estimate | host syncs/step (added) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        syncs = _fmt(r["host_syncs_per_step"])
        if isinstance(r["added_host_syncs_per_step"], float):
            syncs += f" ({r['added_host_syncs_per_step']:+.2f})"
        lines.append(
            f"| {r['book']} | {r['measured_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['efficiency']:.3f} "
            f"| {r['overhead']:+.2%} | {_mib(r['estimated_peak_cache_bytes'])} "
            f"| {_mib(r['measured_peak_cache_bytes'])} | {_mib(r['measured_held_cache_bytes'])} "
            f"| {_fmt(r['memory_vs_estimate'], '{:+.1%}')} | {syncs} |"
        )
    return lines


def _variant_table(rows: list[dict]) -> list[str]:
    lines = [
        "| variant | measured | ideal | efficiency | attention computed | compiled |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        compiled = f"{r['compiled']}, {r['compiled_graphs']} graphs" if r.get("compiled") else ""
        lines.append(
            f"| {r['label']} | {r['measured_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['efficiency']:.3f} "
            f"| {_fmt(r['attention_computed'], '{:.0%}')} | {compiled} |"
        )
    return lines


def _fmt(value, pattern: str = "{:.3g}") -> str:
    if value is None:
        return ""
    return pattern.format(value) if isinstance(value, (int, float)) else str(value)


def _mib(value) -> str:
    return f"{value / 2**20:.1f} MiB" if isinstance(value, (int, float)) else str(value)


# ----- main ------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for gpu-check[-dry-run].{json,md}")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny widths: checks the script")
    parser.add_argument("--plan-only", action="store_true", help="print the time plan (FLOP counts) and exit")
    parser.add_argument("--budget-s", type=float, help="seconds for all sections (default 420; dry run 1200)")
    parser.add_argument("--rounds", type=int, help="timed rounds after a warm-up (default 2; dry run 1)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not args.plan_only and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run with --dry-run (CPU, tiny configs) or --plan-only.", file=sys.stderr
        )
        return 2
    device = torch.device("cuda" if not args.dry_run and not args.plan_only else "cpu")
    if args.dry_run:
        # Tiny models are overhead-bound: a second thread only adds synchronisation, and on a shared CPU whose cores
        # are all busy its spin-waits made a call of the tiny FLUX 25x slower than one thread (5.5 s against 0.2 s).
        torch.set_num_threads(1)
    check = Check(
        device=device,
        dry_run=args.dry_run,
        rounds=args.rounds or (1 if args.dry_run else 2),
        schedule="alternate" if device.type == "cuda" else "lockstep",
        configs=configs(args.dry_run),
        budget=Budget(args.budget_s or (1200.0 if args.dry_run else 420.0)),
    )
    if args.plan_only:
        return print_plan(check, args.sections)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-check-dry-run" if args.dry_run else "gpu-check"
    report = {
        "environment": environment(device, args.dry_run),
        "rounds": check.rounds,
        "warmup_rounds": check.warmup_rounds,
        "schedule": check.schedule,
        "budget_s": check.budget.total_s,
        "elapsed_s": 0.0,
        "configs": {family: config.to_dict() | {"steps": config.steps} for family, config in check.configs.items()},
        "sections": {name: {"status": "pending"} for name in args.sections},
    }
    # dry: one worker, the CPU has two cores; the estimates' torch import costs that one seconds
    pool = start_estimates(check, args.sections, 1 if args.dry_run else ESTIMATE_WORKERS)
    try:
        failed = run_sections(check, args.sections, report, out, stem)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    print(markdown(report))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 1 if failed else 0


def run_sections(check: Check, sections: list[str], report: dict, out: Path, stem: str) -> bool:
    """Every section in turn, the report rewritten after each; True if one failed."""
    failed = False
    for name in sections:
        entry = report["sections"][name]
        started, cpu = time.monotonic(), time.process_time()
        try:
            failed |= not run_section(name, check, entry)
        finally:
            entry["seconds"] = time.monotonic() - started
            entry["cpu_seconds"] = time.process_time() - cpu
            _free(check.device)
        report["elapsed_s"] = check.budget.elapsed()
        write_report(report, out, stem)
    return failed


def run_section(name: str, check: Check, entry: dict) -> bool:
    """Run section ``name`` into ``entry`` unless its estimate exceeds the time left; False if it failed."""
    work, run = SECTIONS[name]
    try:
        estimate = work(check)
        entry["estimate_s"] = check.budget.seconds(estimate)
        refusal = check.budget.refusal(estimate)
        if refusal:
            entry.update(status="skipped", reason=refusal)
            print(f"gpu_check: {name} skipped: {refusal}", file=sys.stderr)
            return True
        print(f"gpu_check: {name} (~{entry['estimate_s']:.0f} s)", file=sys.stderr)
        entry.update(run(check), status="done")
        return True
    except Exception as error:  # one section's failure (out of memory, say) must not lose the others
        entry.update(status="failed", error=f"{type(error).__name__}: {error}".splitlines()[0])
        entry["traceback"] = traceback.format_exc()
        print(entry["traceback"], file=sys.stderr)
        return False


def print_plan(check: Check, sections: list[str]) -> int:
    total = 0.0
    print(f"Time plan at {check.budget.rate_source}, {check.rounds} timed rounds + warm-up:")
    for name in sections:
        seconds = check.budget.seconds(SECTIONS[name][0](check))
        total += seconds
        print(f"  {name:14s} {seconds:6.0f} s")
    print(f"  {'total':14s} {total:6.0f} s (budget {check.budget.total_s:.0f} s)")
    return 0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
