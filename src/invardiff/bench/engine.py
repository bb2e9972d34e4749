"""Engine benchmark: stock transformer vs the engine with a reuse-nothing plan vs the engine with each book.

Two schedules, both in one process and after one warm-up run of every variant:

* ``lockstep`` (default on CPU): every variant has its own copy of the same weights and trajectory, and the
  variants take their step ``i`` one after the other (in an order rotated every step), so slow drifts of a shared
  or throttled CPU hit every variant alike;
* ``alternate`` (default on GPU, where copies of FLUX.1-dev would not fit): one transformer; whole runs alternate,
  the engine being enabled and disabled between them.

Per round each variant's time is the sum of its transformer calls. Reported, as medians over rounds of per-round
ratios: measured speedup (stock / book), overhead (reuse-nothing / stock - 1); and the ideal speedup (FLOPs,
``invardiff.stats``), the efficiency (measured / ideal), and the book's peak cache bytes against what keeping every
unit output of a step would take.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from .. import api
from ..families import FamilySpec, LazyTable, families, get_family
from ..families.model_config import ModelConfig
from ..flops import profile_flops
from ..model_configs import MODEL_CONFIGS
from ..plan import CachePlan
from ..stats import extrapolation_work, ideal_speedup
from .extrapolation_cost import extrapolation_costs
from .loop import Trajectory
from .plans import bench_plan, is_plan_file
from .timing import Variant, measure_rounds, round_progress


# Which model config each family runs on, per benchmark size: ``{size: {family: config name}}``, from the family
# files (``FamilySpec.configs.bench``; ``"tiny"`` is overhead-bound, for tests only).
BENCH_CONFIGS = LazyTable(
    lambda: {
        size: {spec.name: spec.configs.bench[size] for spec in families() if size in _bench_sizes(spec)}
        for size in ("cpu", "full", "tiny")
    }
)


def _bench_sizes(spec) -> dict[str, str]:
    return spec.configs.bench if spec.configs else {}


def bench_family(
    family: str,
    size: str,
    books: list[str],
    device: torch.device,
    rounds: int,
    schedule: str = "lockstep",
    progress: Callable[[str | None], None] | None = None,
    compile_blocks: bool = False,
    backend: str = "inductor",
    *,
    config: ModelConfig | None = None,
    instrument: Callable[[Variant], Variant] | None = None,
    on_results: Callable[[list[dict], dict[str, Variant]], None] | None = None,
    warmup_rounds: int = 1,
) -> list[dict]:
    """Benchmark the ``books`` (official books like ``"flux/fast"``, synthetic plans like ``"wan/synthetic-2x"``,
    ``invardiff.bench.plans``) of one family; one result dict per book.

    ``compile_blocks``: every variant, stock included, runs with its blocks compiled (:func:`compile_regions`,
    torch.compile's ``backend``), so the speedup is plan-compiled over stock-compiled; compilation happens in the
    warm-up round. The results' ``compiled`` says how.

    ``config`` replaces the family's benchmark config of ``size`` (a reduced video size, say). For device
    measurements (``benchmarks/gpu_check.py``): ``instrument`` wraps each timed variant (``"stock"``,
    ``"reuse_nothing"``, each book) before the rounds, and ``on_results(results, variants)`` is called after them
    with the result dicts (to add fields to) and the wrapped variants by name, whose transformers are still alive.
    ``warmup_rounds``: untimed rounds first (0 only where the figures do not matter: a dry run of a script).
    """
    config = config or MODEL_CONFIGS[BENCH_CONFIGS[size][family]]
    plans = {name: bench_plan(name, config) for name in books}
    steps = next(iter(plans.values())).num_inference_steps
    any_plan = next(iter(plans.values()))
    variants = {"stock": None, "reuse_nothing": CachePlan.reuse_nothing(any_plan.model, steps), **plans}
    stock = config.build_transformer(device)
    compiled: list[str] = []  # how the blocks were compiled (the same for every variant)
    compile_ = None
    if compile_blocks:
        torch._dynamo.reset()
        counters.clear()
        spec = get_family(family)

        def compile_(transformer: torch.nn.Module) -> None:
            compiled.append(compile_regions(transformer, spec, backend))

    if schedule == "lockstep":
        timed_variants, summaries = _lockstep_variants(stock, config, variants, steps, device, compile_)
    elif schedule == "alternate":
        if compile_ is not None:
            compile_(stock)
        timed_variants, summaries = _alternating_variants(stock, config, variants, steps, device)
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; expected 'lockstep' or 'alternate'.")

    if instrument is not None:
        timed_variants = [instrument(variant) for variant in timed_variants]
    callbacks = round_progress(progress, config.name, rounds)
    times = measure_rounds(
        timed_variants, rounds, warmup_rounds=warmup_rounds, steps=steps, schedule=schedule, **callbacks
    )
    per_round = times.seconds

    flops = profile_flops(config)
    costs = extrapolation_costs(flops, device, config.torch_dtype, repeats=50)  # reuse with and without a lerp
    overhead = times.median_ratio("reuse_nothing", "stock") - 1.0
    results = []
    for name, plan in plans.items():
        ideal = ideal_speedup(plan, flops)
        speed = times.speedup("stock", name, ideal, label=f"{name} on {config.name}")
        results.append(
            {
                "book": name,
                "source": name if is_plan_file(name) else plan.provenance.get("source", {}).get("file", "synthetic"),
                "model_config": config.name,
                "device": str(device),
                "dtype": config.dtype,
                "schedule": schedule,
                "compiled": compiled[0] if compiled else None,
                "compiled_graphs": counters["stats"]["unique_graphs"] if compile_blocks else None,
                "num_steps": steps,
                "rounds": rounds,
                **speed,
                "ideal_speedup": ideal,
                "efficiency": speed["measured_speedup"] / ideal,
                "overhead": overhead,
                "peak_cache_bytes": summaries[name].peak_cache_bytes,
                "all_outputs_bytes": summaries[name].all_outputs_bytes,
                "median_seconds": {v: times.median_seconds(v) for v in ("stock", "reuse_nothing", name)},
                "seconds_per_round": {v: per_round[v] for v in ("stock", "reuse_nothing", name)},
                "extrapolated_entries": extrapolation_work(plan, flops),
                "reused_entry_cost": costs,
            }
        )
    if on_results is not None:
        on_results(results, {variant.name: variant for variant in timed_variants})
    return results


def compile_regions(transformer: torch.nn.Module, family: FamilySpec, backend: str = "inductor") -> str:
    """Regional compilation of ``transformer``, in place; returns how, for a report.

    diffusers' ``compile_repeated_blocks`` where the class declares ``_repeated_blocks`` (Flux, Wan, HunyuanVideo);
    otherwise each block of the family's block lists is compiled on its own (``module.compile``, which is what
    ``compile_repeated_blocks`` does to each block it finds): the same regions, found through the family spec
    instead of the class attribute, which ``DiTTransformer2DModel`` leaves empty (diffusers then refuses).
    """
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(backend=backend)
        return f"compile_repeated_blocks ({backend})"
    for block_list in family.block_lists:
        for block in getattr(transformer, block_list.attr):
            block.compile(backend=backend)
    lists = ", ".join(block_list.attr for block_list in family.block_lists)
    return (
        f"each block of {lists} compiled on its own ({backend}; {type(transformer).__name__} declares no "
        f"_repeated_blocks for compile_repeated_blocks)"
    )


def _lockstep_variants(stock, config, variants, steps, device, compile_: Callable | None = None):
    """Every variant on its own copy of the weights, its plan enabled for good; summaries read after each round."""
    summaries = {}
    timed_variants = []
    for name, plan in variants.items():
        transformer = stock if plan is None else copy.deepcopy(stock)
        if plan is not None:
            api.enable(transformer, plan)
        if compile_ is not None:  # copies share the compiled graphs: Dynamo guards on block classes, not instances
            compile_(transformer)
        trajectory = Trajectory(transformer, config, steps, device)
        finish = _summary_recorder(summaries, name, transformer) if plan is not None else _nothing
        timed_variants.append(Variant(name, _timed_step(trajectory), start=trajectory.restart, finish=finish))
    return timed_variants, summaries


def _summary_recorder(summaries: dict, name: str, transformer) -> Callable[[], None]:
    return lambda: summaries.__setitem__(name, api.summary(transformer))


def _alternating_variants(stock, config, variants, steps, device):
    """One transformer: each whole run enables its plan first and disables it after (reading its summary)."""
    trajectory = Trajectory(stock, config, steps, device)
    summaries = {}

    def start(plan) -> Callable[[], None]:
        def enable() -> None:
            if plan is not None:
                api.enable(stock, plan)
            trajectory.restart()

        return enable

    def finish(name, plan) -> Callable[[], None]:
        def disable() -> None:
            if plan is not None:
                summaries[name] = api.summary(stock)
                api.disable(stock)

        return disable

    timed_variants = [
        Variant(name, _timed_step(trajectory), start(plan), finish(name, plan)) for name, plan in variants.items()
    ]
    return timed_variants, summaries


def _timed_step(trajectory: Trajectory) -> Callable[[int], float]:
    """Step ``index`` of ``trajectory``; returns the seconds of its transformer call (synchronized: loop.py)."""

    def step(index: int) -> float:
        before = trajectory.seconds
        trajectory.step(index)
        return trajectory.seconds - before

    return step


def _nothing() -> None:
    return None
