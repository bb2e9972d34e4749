"""The speed-quality sweep on a target (bundled model or user pipeline): which operating points, calibrated how."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..calibration import calibrate
from ..calibration.thresholds import PRESETS, uniform_thresholds
from ..demo import generate_cases
from ..families import get_family, is_video
from ..families.calibration_spec import InvarDiffThresholds
from ..plan_transforms import cap_step_runs
from ..stats import extrapolation_work
from .peers import FEW_STEPS
from .points import dicache_point, plan_point, plan_probe_point
from .sweep import OperatingPoint, SweepInputs
from .targets import CALIBRATION_SEED, SweepTarget, check_held_out  # noqa: F401 (CALIBRATION_SEED: benchmarks)


METHODS = (
    "invardiff",
    "invardiff-grid",
    "invardiff-capped",
    "invardiff-search",
    "invardiff-search+extrap",
    "invardiff-frontier",
    "invardiff-frontier2",
    "invardiff-memory",
    "dicache",
    "plan+probe",
    "peers",
)
# What `invardiff bench` runs without --methods: all but the invardiff-frontier methods, whose descent on sampled error
# adds minutes per target (on this 2-core CPU, one thread: ~3 min for flux-shapes' three targets, ~9 min for
# dit-digits' 4x and 5x); ask for them by name.
FRONTIER_METHODS = ("invardiff-frontier", "invardiff-frontier2")
DEFAULT_METHODS = tuple(method for method in METHODS if method not in FRONTIER_METHODS)
# DiCache thresholds besides the official 0.4 (SPEC.md B.5), chosen to span slow to fast on the bundled models
# (1.5 was measured too: it collapses, 22.9 dB on flux-shapes and 10.2 dB on dit-digits). The same for every family.
DICACHE_THRESHOLDS = (0.1, 0.2, 0.8)
# DiCache at its most aggressive (issue 27: peers beside the 4-5x targets): its warm-up (a fifth of the steps) and
# its probe (a block of the 5-8) cap it near 3x ideal on the bundled models, so the warm-up is halved too.
DICACHE_AGGRESSIVE = {"threshold": 1.5, "warmup_ratio": 0.1}
# plan+probe runs on the fast preset and on an aggressive plan (step 0.8, modules 0.68), whose bad reuses the
# probe should veto. Thresholds per plan and family: points that measured the same executed steps as another
# point (or as the plan alone) in the 2026-11-22 sweep are left out to keep the default sweep under 30 minutes
# (flux-shapes: the aggressive plan vetoes like the fast one at 0.1 and 0.2; dit-digits: the fast plan is
# vetoed only at 0.1).
AGGRESSIVE = (0.8, 0.68)
PLAN_PROBE_THRESHOLDS = {
    "flux": {"fast": (0.1, 0.2, 0.3)},
    "dit": {"fast": (0.1,), AGGRESSIVE: (0.1, 0.2, 0.3)},
}
# Families not listed: the aggressive plan, a grid plan, which every family has (presets may be missing).
DEFAULT_PLAN_PROBE_THRESHOLDS = {AGGRESSIVE: (0.1, 0.2, 0.3)}
# InvarDiff grid in the spirit of the paper's 35-point figure (SPEC.md A.8): step quantile x module bundles.
GRID_STEP_LEVELS = (0.5, 0.6, 0.7, 0.8)
GRID_MODULE_LEVELS = (0.0, 0.4, 0.68)
# invardiff-capped: aggressive grid plans (step level, module level) with at most K consecutive step-cached
# steps, by K. Module level 0 is left out: capped at 2, it is slower than 2x on both bundled models. A cap of 3
# carries the capped front past 2.5x (flux-shapes, step 0.8 / modules 0.68: 2.63x ideal, 34.8 dB).
CAPPED = {2: ((0.7, 0.4), (0.7, 0.68), (0.8, 0.4), (0.8, 0.68)), 3: ((0.8, 0.4), (0.8, 0.68))}


# invardiff-search: plans searched at these FLOP-ideal speedups (calibration/search.py) from one recording of the
# calibration trajectories, each verified by sampling the calibration inputs (calibration/budget.py); "+extrap"
# also extrapolates reused steps and units with the fitted coefficients.
# 4x-5x are the sweep's high targets (issue 27): out of reach on a model, the search skips them with a warning.
SEARCH_SPEEDUPS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
SEARCH_WINDOW = 6
# invardiff-frontier: the 4-5x recipe (benchmarks/results/frontier/README.md) at the search targets from 4x up:
# reused steps extrapolated (units reused plainly), a 12-step recording window (longer reuse runs and anchor gaps),
# and 8 rounds of descent on sampled error (calibrate --budget 4 --extrapolate steps --window 12 --verify
# --refine 8). At 4x on the sweep's images: 35.13 dB on flux-shapes (the search's own settings: 32.29), 36.90 on
# dit-digits (34.40).
FRONTIER_FROM = 4.0
FRONTIER_WINDOW = 12
FRONTIER_REFINE = 8
# invardiff-frontier2: the same recipe, its plans then refitted at second order (--step-order 2, kept where they
# sample closer) from a 20-step recording: the refit reads up to three gaps between computed steps back (dit-digits
# at 5x: 10 of 50 steps computed), which the 12-step window the search keeps would leave out for most reused steps.
FRONTIER_FIT_WINDOW = 20


@dataclass(frozen=True)
class SweepGrid:
    """The InvarDiff points of a sweep and its evaluation inputs, per kind of model.

    Attributes:
        step_levels / module_levels: the invardiff-grid quantiles.
        capped: invardiff-capped, ``{max run: ((step level, module level), ...)}``.
        search_speedups: the FLOP-ideal targets of invardiff-search.
        search_refine: rounds of descent on sampled error after the verified selection of invardiff-search
            (``calibrate_budget(refine=...)``; 0: none).
        plan_probe: plan+probe thresholds per plan, for families without their own in :data:`PLAN_PROBE_THRESHOLDS`.
        examples: how many of the model's examples are evaluated (``None``: all).
    """

    step_levels: tuple
    module_levels: tuple
    capped: dict
    search_speedups: tuple
    plan_probe: dict
    examples: int | None = None
    search_refine: int = 0


IMAGE_SWEEP = SweepGrid(GRID_STEP_LEVELS, GRID_MODULE_LEVELS, CAPPED, SEARCH_SPEEDUPS, DEFAULT_PLAN_PROBE_THRESHOLDS)
# The video model (wan-motion: a run is a clip of 8 frames at 50 steps with CFG, about 2.5 s) runs a smaller sweep
# to finish within 30 minutes on the 2-core CPU (the full image-model set took 70 s a point with 4 clips: 50
# minutes): 2 evaluation clips (the first two examples: every colour, shape, direction and speed differs between
# them; 16 frames), the grid's step levels 0.6 and 0.8 with modules 0 and 0.68, the capped plans at step 0.8 /
# modules 0.68, the search at the speedups the comparisons are made at, and plan+probe at 0.1 and 0.2. DiCache and
# the peers keep the image models' settings.
VIDEO_SWEEP = SweepGrid(
    step_levels=(0.6, 0.8),
    module_levels=(0.0, 0.68),
    capped={2: ((0.8, 0.68),), 3: ((0.8, 0.68),)},
    search_speedups=(2.0, 2.5, 3.0, 4.0, 4.5, 5.0),
    plan_probe={AGGRESSIVE: (0.1, 0.2)},
    examples=2,
)
# Few-step sweeps (a bundled model at --steps peers.FEW_STEPS or fewer, e.g. a distilled model's 4-8 steps): with a
# step or two between computed ones at most, whole-step reuse has little room, so the points lean on unit reuse
# (the grid's step level 0: unit-only plans) and on low search targets; 4.5x and 5x are out of reach in 8 steps.
# The grid is small (unit-only plans at two module levels, one step level alone) and there are no capped plans
# (the search decides each step's reuse): a few-step sweep adds to the model's own sweep, it does not redo it.
# A video model evaluates as many clips as in its own sweep (VIDEO_SWEEP.examples).
# The search descends on sampled error after its verified selection (FEW_STEP_REFINE rounds): at a few steps the
# additive model's choice of which step to reuse is often not the one that samples closest, and a round costs a
# handful of short runs. Held out, against the same search without descent at the 24 points of the 4- and 8-step
# sweeps of commit 4b5588a (`python benchmarks/frontier.py --model MODEL --steps N --speedups 1.3,1.5,2 --refine 4`,
# files benchmarks/results/frontier/frontier-MODEL-N-steps-refine4.md): 0.9-6.9 dB higher at 10 (flux-shapes at 4
# steps, 1.3x with extrapolation: 31.26 -> 32.64 dB; dit-digits at 8 steps, 1.5x: 25.82 -> 32.69), the same at 10,
# 0.2-1.5 dB lower at 4. At a model's own 28-50 steps the same descent fits the few calibration runs instead and is
# not used by the sweep's search (frontier-MODEL-2x-3.5x-refine4.md: flux-shapes +extrap 2x 51.46 -> 48.83 dB,
# 2.5x 43.91 -> 42.86; dit-digits -0.3 to +1.1 dB); the frontier recipe's 8 rounds at 4x-5x are measured apart.
FEW_STEP_REFINE = 4
FEW_STEP_SWEEP = SweepGrid(
    step_levels=(0.0, 0.5),
    module_levels=(0.0, 0.68),
    capped={},
    search_speedups=(1.3, 1.5, 2.0, 2.5, 3.0),
    plan_probe={AGGRESSIVE: (0.1, 0.2)},
    search_refine=FEW_STEP_REFINE,
)


def comparison_speedups(num_steps: int) -> tuple[float, ...]:
    """The speedups the sweep's equal-speed tables compare methods at: lower at a few steps, where 2x is already
    far (a step in two reused); up to the search's 4x and 5x targets otherwise."""
    return (1.3, 1.5, 2.0) if num_steps <= FEW_STEPS else (2.0, 2.5, 3.0, 4.0, 5.0)


def sweep_name(model: str, num_steps: int | None = None) -> str:
    """The name a sweep's files carry (``sweep-NAME.jsonl``): the model's, with ``-N-steps`` for a bundled model swept
    at another step count than its own (``invardiff bench --model MODEL --steps N``)."""
    return f"{model}-{num_steps}-steps" if num_steps is not None else model


def sweep_folder(num_steps: int | None = None) -> str:
    """Where the committed sweeps lie, relative to the repository root: ``benchmarks/results/sweep`` for the models'
    own step counts, ``benchmarks/results/sweep-few-step`` for sweeps at another (``--steps N``)."""
    return f"benchmarks/results/{'sweep-few-step' if num_steps is not None else 'sweep'}"


def sweep_grid(family: str, num_steps: int | None = None) -> SweepGrid:
    """The grid of ``family``'s sweep; a sweep of ``num_steps`` <= :data:`FEW_STEPS` steps runs the few-step one."""
    own = VIDEO_SWEEP if is_video(family) else IMAGE_SWEEP
    if num_steps is not None and num_steps <= FEW_STEPS:
        return dataclasses.replace(FEW_STEP_SWEEP, examples=own.examples)
    return own


def sweep_inputs(
    target: SweepTarget, seeds: list[int], device: str = "cpu", cases: list[tuple] | None = None, batch: int = 1
) -> SweepInputs:
    """The evaluation images: every example with every seed, or the given (input, seed) ``cases``; ``batch`` images
    per pipeline call. None of them may be a calibration run of the target (:func:`check_held_out`)."""
    entry = target.entry
    examples = entry.examples[: sweep_grid(target.family, entry.num_inference_steps).examples]
    cases = cases or [(item, seed) for seed in seeds for item in examples]
    check_held_out(target, cases)
    return SweepInputs(
        model=target.name,
        load_pipeline=target.load,
        generate=lambda pipe: generate_cases(pipe, entry, cases, batch),
        cases=[{"input": item, "seed": seed} for item, seed in cases],
        device=torch.device(device),
    )


def sweep_evaluation(target: SweepTarget, inputs: SweepInputs, batch: int = 1) -> dict:
    """What a sweep point's quality figures depend on besides its own settings (its label): the evaluated cases, the
    images per call, the step count, the sampling arguments and the calibration runs every method calibrated on.
    A resumed sweep keeps a point only when these match (``sweep_report.check_resumable``)."""
    sampling = {k: v for k, v in target.sampling_settings().items() if isinstance(v, (int, float, str, bool))}
    return {
        "cases": inputs.cases,
        "batch": batch,
        "steps": target.entry.num_inference_steps,
        "sampling": sampling,
        "calibration": [list(run) for run in target.calibration_runs()],
    }


def calibrate_thresholds(target: SweepTarget, thresholds):
    """A threshold plan (a preset name or :class:`InvarDiffThresholds`) calibrated on ``target``'s calibration runs."""
    plan, _ = calibrate(
        target.load(),
        num_inference_steps=target.entry.num_inference_steps,
        thresholds=thresholds,
        cases=target.calibration_runs(),  # the held-out rule (targets.py)
        pipeline_kwargs=target.calibration_kwargs() or None,
    )
    return plan


def _search_points(target: SweepTarget, method: str) -> list[OperatingPoint]:
    # The trajectories are recorded at the sampling guidance (the calls the plan will run, both CFG halves when
    # the pipeline batches them), on the target's calibration runs (the held-out rule, targets.py).
    from ..calibration.budget import calibrate_budget
    from ..calibration.search import SearchConfig

    grid = sweep_grid(target.family, target.entry.num_inference_steps)
    speedups = grid.search_speedups
    settings = {"window": SEARCH_WINDOW, "refine": grid.search_refine}
    if method in FRONTIER_METHODS:
        speedups = tuple(s for s in speedups if s >= FRONTIER_FROM)
        if not speedups:  # a few-step sweep's targets stop below 4x
            return []
        config = SearchConfig(speedups[-1], extrapolate_steps=True)
        settings = {"window": FRONTIER_WINDOW, "refine": FRONTIER_REFINE}
        if method == "invardiff-frontier2":
            config = dataclasses.replace(config, step_order=2)
            settings["fit_window"] = FRONTIER_FIT_WINDOW
    else:
        extrapolate = method == "invardiff-search+extrap"
        config = SearchConfig(speedups[-1], extrapolate_steps=extrapolate, extrapolate_units=extrapolate)
    results, _ = calibrate_budget(
        target.load(),
        num_inference_steps=target.entry.num_inference_steps,
        cases=target.calibration_runs(),
        speedups=list(speedups),
        search=config,
        pipeline_kwargs=target.sampling_settings(),
        verify=True,  # each target's plan chosen among caps of 2, 3, 6 reused steps by its sampled error
        **settings,
    )
    return [
        plan_point(
            f"{method} {result.plan.provenance['search']['speedup']:g}x",
            result.plan,
            {
                **result.plan.provenance["search"],
                **settings,
                "calibration_error": result.error,
                "extrapolated_entries": extrapolation_work(result.plan),  # reported beside their measured cost
            },
            method=method,
        )
        for result in results
    ]


def grid_point(family: str, step: float, level: float) -> tuple[str, InvarDiffThresholds]:
    """The label and thresholds of the invardiff-grid point at step quantile ``step`` and module quantile ``level``."""
    return f"grid step={step:g} modules={level:g}", uniform_thresholds(family, step, level)


def sweep_points(
    target: SweepTarget,
    methods: tuple[str, ...],
    progress: Callable[[str], None] | None = None,
    peer_points: Callable[[SweepTarget], list[OperatingPoint]] | None = None,
) -> list[OperatingPoint]:
    """The operating points of ``methods`` on ``target`` (plans are calibrated here)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; expected some of {METHODS}.")
    family = target.family
    grid = sweep_grid(family, target.entry.num_inference_steps)
    note = progress or (lambda message: None)
    points, plans = [], {}
    if {"invardiff", "plan+probe"} & set(methods):
        for preset in PRESETS[family]:
            note(f"calibrating {preset}")
            plans[preset] = calibrate_thresholds(target, preset)
    if "invardiff" in methods:
        points += [plan_point(f"invardiff {p}", plan, {"preset": p}) for p, plan in plans.items()]
    grid_plans: dict[tuple[float, float], object] = {}

    def grid_plan(step: float, level: float):
        # Calibration is deterministic, so the grid, the capped plans and plan+probe share one per level pair.
        if (step, level) not in grid_plans:
            label, thresholds = grid_point(family, step, level)
            note(f"calibrating {label}")
            grid_plans[step, level] = calibrate_thresholds(target, thresholds)
        return grid_plans[step, level]

    if "invardiff-grid" in methods:
        for step in grid.step_levels:
            for level in grid.module_levels:
                if step == level == 0:  # reuses nothing: full compute
                    continue
                label, thresholds = grid_point(family, step, level)
                points.append(plan_point(f"invardiff {label}", grid_plan(step, level), thresholds.to_dict()))
    for method in ("invardiff-search", "invardiff-search+extrap", *FRONTIER_METHODS):
        if method in methods:
            note(f"searching {method}")
            points += _search_points(target, method)
    if "invardiff-memory" in methods:  # plans held to a cache-memory bound (memory_points.py)
        from .memory_points import memory_points

        preset = "fast" if "fast" in PRESETS[family] else next(iter(PRESETS[family]))
        if preset not in plans:
            note(f"calibrating {preset}")
            plans[preset] = calibrate_thresholds(target, preset)
        note("fitting invardiff-memory")
        points += memory_points(target, preset, plans[preset])
    if "invardiff-capped" in methods:
        for max_run, levels in grid.capped.items():
            for step, level in levels:
                label, thresholds = grid_point(family, step, level)
                plan = cap_step_runs(grid_plan(step, level), max_run)
                settings = {**thresholds.to_dict(), "max_step_run": max_run}
                points.append(plan_point(f"invardiff {label} max-run={max_run}", plan, settings))
    # Per-sample and batch-global decisions differ only when a call carries several rows: pipelines that batch
    # the CFG branches (DiTPipeline) get both modes measured; flux-shapes calls carry one row.
    modes = (True, False) if get_family(family).pipeline.batched_cfg else (True,)
    if "dicache" in methods:
        for per_sample in modes:
            points.append(dicache_point(family, per_sample=per_sample))
            points += [dicache_point(family, t, per_sample=per_sample) for t in DICACHE_THRESHOLDS]
            points.append(dicache_point(family, **DICACHE_AGGRESSIVE, per_sample=per_sample))
    if "plan+probe" in methods:
        for plan_key, deltas in PLAN_PROBE_THRESHOLDS.get(family, grid.plan_probe).items():
            if isinstance(plan_key, str):
                plan_label, plan = plan_key, plans[plan_key]
            else:
                plan_label, plan = grid_point(family, *plan_key)[0], grid_plan(*plan_key)
            points += [
                plan_probe_point(plan_label, plan, delta, per_sample) for per_sample in modes for delta in deltas
            ]
    if "peers" in methods:
        if peer_points is None:
            raise ValueError("peers requested but no peer point builder given")
        points += peer_points(target)
    return points
