"""The CLI's budgeted calibration (``calibrate --budget`` / ``--pareto``) and ``resample-plan``: thin wrappers over
``invardiff.calibration.budget`` and ``invardiff.plan_transforms``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .parsing import CACHE_DTYPES, at_least


EXTRAPOLATE = ("none", "steps", "units", "both")


def add_search_arguments(p) -> None:
    """``calibrate`` options of the budgeted search (instead of --preset / --thresholds)."""
    group = p.add_argument_group("budgeted search (instead of --preset / --thresholds)")
    group.add_argument(
        "--budget",
        help="FLOP-ideal speedup target, e.g. 2.5x: the plan of least calibration-set error at that speedup",
    )
    group.add_argument(
        "--pareto",
        help="comma-separated targets, e.g. 1.5,2,2.5,3: one plan per target, written as OUTPUT-<target>x.json",
    )
    group.add_argument(
        "--extrapolate",
        choices=EXTRAPOLATE,
        default="none",
        help="reused steps and/or units extrapolate from their last two computed values with fitted coefficients "
        "(plan format version 2)",
    )
    group.add_argument(
        "--step-order",
        type=int,
        choices=(1, 2),
        default=1,
        help="with --extrapolate steps (or both): 2 refits the searched plan's reused steps with a second-order "
        "term from their last three computed steps where --fit-window holds them (plan format version 4; with "
        "--verify, kept only where it samples closer than first order). dit-digits 4x: 39.7 dB against 36.9; "
        "flux-shapes 4x samples worse at second order and keeps first",
    )
    group.add_argument(
        "--fit-window",
        type=int,
        help="with --step-order 2: record this many steps back (default --window) for the second-order refit, "
        "while the search keeps --window; about three gaps between computed steps (20 at 4-5x on 50 steps)",
    )
    group.add_argument(
        "--max-cache-memory",
        metavar="SIZE",
        help="at most this much peak cache memory in a run at the calibration call's shapes (e.g. 1.5GB, 800MiB; "
        "the engine's own accounting on the meta device): the search's plans are fitted to it, and searched "
        "faster until the fitted plan meets the budget",
    )
    group.add_argument(
        "--cache-dtype",
        choices=CACHE_DTYPES,
        help="store cached values in this dtype (plan format version 3; fp8 with a per-tensor scale)",
    )
    group.add_argument(
        "--window",
        type=int,
        default=6,
        help="longest reuse run the trajectories support (default 6); at 4x and above, with --extrapolate steps, a "
        "window of twice the gap between computed steps lets every reused step extrapolate (flux-shapes 4x at 28 "
        "steps: --window 12 --verify --refine 8, 35.1 dB against 33.5 without extrapolation; the recording grows "
        "with it)",
    )
    group.add_argument("--max-run", type=int, help="at most this many consecutive reused steps (default: --window)")
    group.add_argument("--warmup-steps", type=int, default=1, help="leading steps that compute everything")
    group.add_argument(
        "--verify",
        action="store_true",
        help="search each target under caps of 2, 3, 4, 5 and --window reused steps, each with unit reuse on the "
        "computed steps, at the last step only and without (with --extrapolate: each with and without "
        "extrapolation), sample every distinct plan on the calibration inputs and keep the one closest to full "
        "compute (up to 15 more sampling runs per target, 30 with --extrapolate, one more with --step-order 2; "
        "replaces --max-run)",
    )
    group.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="with --verify: then up to ROUNDS moves of one computed step by one step, each kept only where the "
        "sampled calibration error drops (up to 2 sampling runs per computed step a round; default 0)",
    )


def resample_arguments(p) -> None:
    p.add_argument("plan", help="a plan file")
    p.add_argument(
        "--steps",
        type=at_least(3, "a step count"),
        required=True,
        help="the new num_inference_steps (3 to 1000, the schedulers' training timesteps)",
    )
    p.add_argument("-o", "--output", required=True)


def wants_search(args) -> bool:
    return bool(getattr(args, "budget", None) or getattr(args, "pareto", None))


def refuse_memory_options(args) -> None:
    """--max-cache-memory / --cache-dtype shape the budgeted search only; a preset's plan is fitted afterwards."""
    given = [name for name in ("max_cache_memory", "cache_dtype") if getattr(args, name, None) is not None]
    if given and not wants_search(args):
        option = "--" + given[0].replace("_", "-")
        raise ValueError(
            f"{option} applies to the budgeted search (--budget / --pareto); to bound a preset's plan, fit it "
            f"afterwards: invardiff fit-memory PLAN --model NAME --max-cache-memory SIZE -o OUT."
        )


def calibrate_budget(args, pipe, steps: int, runs: dict, extra: dict) -> int:
    from ..calibration.budget import calibrate_budget as run
    from ..calibration.budget import sampled_mse
    from ..calibration.search import SearchConfig, parse_budget
    from ..calibration.trajectory import refuse_experts

    if args.budget and args.pareto:
        raise ValueError("Give either --budget (one plan) or --pareto (one plan per target), not both.")
    if getattr(args, "preset", None) or getattr(args, "thresholds", None):
        raise ValueError("--budget / --pareto search the plan: drop --preset / --thresholds.")
    if getattr(args, "ray", None) is not None:
        raise ValueError("--ray does not apply to --budget / --pareto yet: the trajectories are recorded in-process.")
    if args.refine < 0 or (args.refine and not args.verify):
        raise ValueError(f"--refine takes a number of rounds >= 0 and needs --verify, got --refine {args.refine}.")
    if args.verify and args.max_run is not None:
        raise ValueError("--verify chooses the cap on reused runs itself (2, 3, 4, 5 or --window): drop --max-run.")
    hint = few_step_hint(steps, args.verify, args.refine)
    if hint:
        print(hint, file=sys.stderr)
    try:
        refuse_experts(pipe)
    except NotImplementedError as error:
        raise ValueError(str(error)) from None  # a one-line error (exit status 2), as for any option it refuses
    speedups = [parse_budget(args.budget)] if args.budget else [parse_budget(s) for s in args.pareto.split(",")]
    max_cache_bytes = None
    if args.max_cache_memory is not None:
        from ..memory_fit import parse_size

        max_cache_bytes = parse_size(args.max_cache_memory)
    if args.cache_dtype and args.extrapolate != "none":
        raise ValueError("--cache-dtype does not go with --extrapolate (plans cannot have both); drop one.")
    if args.step_order == 2 and args.extrapolate not in ("steps", "both"):
        raise ValueError("--step-order 2 is the order reused steps extrapolate with: add --extrapolate steps.")
    config = SearchConfig(
        max(speedups),
        warmup_steps=args.warmup_steps,
        max_run=args.max_run,
        extrapolate_steps=args.extrapolate in ("steps", "both"),
        extrapolate_units=args.extrapolate in ("units", "both"),
        step_order=args.step_order,
    )
    if args.fit_window is not None and args.step_order != 2:
        raise ValueError("--fit-window is how far back the second-order refit reads: it needs --step-order 2.")
    results, stats = run(
        pipe,
        num_inference_steps=steps,
        cases=_cases(runs),
        speedups=speedups,
        search=config,
        window=args.window,
        batch_size=args.batch_size,
        pipeline_kwargs=extra,
        verify=args.verify,
        max_cache_bytes=max_cache_bytes,
        cache_dtype=args.cache_dtype,
        refine=args.refine,
        fit_window=args.fit_window,
    )
    if not results:
        raise ValueError(f"No target of {speedups} is reachable; see the warnings above.")
    output = Path(args.output)
    for result in results:
        target = result.plan.provenance["search"]["speedup"]
        path = output if args.budget else output.with_name(f"{output.stem}-{target:g}x{output.suffix}")
        result.plan.save(path)
        computed = int((~result.plan.step_cache).sum())
        sampled = sampled_mse(result.plan)
        checked = f", sampled output MSE {sampled:.3g}" if sampled is not None else ""
        fit = result.plan.provenance.get("memory_fit")
        if fit is not None:
            checked += f", peak cache {fit['peak_cache_bytes']['after'] / 2**20:.1f} MiB after the memory fit"
        print(
            f"wrote {path} ({result.ideal_speedup:.3f}x ideal, {computed}/{steps} steps computed, "
            f"calibration error {result.error:.4g}{checked})"
        )
    trajectories = output.with_name(output.stem + ".trajectories.npz")
    stats.save(trajectories)
    print(f"wrote {trajectories} (search more budgets without the model: invardiff.calibration.search)")
    return 0


def few_step_hint(steps: int, verify: bool, refine: int) -> str | None:
    """The note ``calibrate --budget`` prints at a few steps without the descent on sampled error, else None."""
    from ..bench.bundled import FEW_STEP_REFINE, FEW_STEPS

    if steps > FEW_STEPS or refine:
        return None
    add = f"--refine {FEW_STEP_REFINE}" if verify else f"--verify --refine {FEW_STEP_REFINE}"
    return (
        f"invardiff calibrate: at {steps} steps the additive error model often reuses a step that does not sample "
        f"closest to full compute; add {add} to descend on sampled error (a few short runs; README: few-step "
        "sampling)."
    )


def _cases(runs: dict) -> list[tuple]:
    """The CLI's calibration inputs as (input, seed) cases, with the same seed rule as ``calibrate``."""
    if "cases" in runs:
        return [tuple(case) for case in runs["cases"]]
    items = runs.get("prompts") or runs.get("class_labels")
    if "seeds" in runs:
        return [(item, seed) for seed in runs["seeds"] for item in items]
    return [(item, runs["seed"] + index) for index, item in enumerate(items)]


def resample_plan(args: argparse.Namespace) -> int:
    from ..plan import CachePlan
    from ..plan_transforms import resample_plan as resample

    plan = CachePlan.load(args.plan)
    resampled = resample(plan, args.steps)
    resampled.save(args.output)
    print(
        f"wrote {args.output}: {plan.num_inference_steps} -> {args.steps} steps, "
        f"{int(plan.step_cache.sum())} -> {int(resampled.step_cache.sum())} steps step-cached"
        + (" (extrapolation coefficients dropped: recalibrate for them)" if plan.extrapolates else "")
    )
    return 0
