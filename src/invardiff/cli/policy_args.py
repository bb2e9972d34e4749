"""Command-line options that choose a cache policy (plan, DiCache, plan+probe) and build its config. Defining the
options imports nothing heavy (`generate --help` stays free of torch); building the config does."""

from __future__ import annotations

import argparse

from .parsing import registry_choice


POLICIES = ("plan", "dicache", "plan+probe")
# The policies each option applies to (by its argparse dest); an option given with another policy is refused.
APPLIES_TO = {
    "plan": ("plan", "plan+probe"),
    "dicache_preset": ("dicache",),
    "threshold": ("dicache", "plan+probe"),
    "probe_depth": ("dicache", "plan+probe"),
    "error": ("dicache", "plan+probe"),
    "warmup_ratio": ("dicache",),
    "gamma_max": ("dicache",),
    "batch_global": ("dicache", "plan+probe"),
    "step_reuse": ("plan",),
}


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cache policy")
    group.add_argument("--plan", help="an InvarDiff plan (policy plan or plan+probe)")
    group.add_argument(
        "--policy", choices=POLICIES, help="default: plan when --plan is given, else full compute (no cache)"
    )
    group.add_argument(
        "--dicache-preset",
        type=registry_choice(_dicache_presets, "DiCache presets"),
        help="official DiCache setting (default: the family's)",
    )
    group.add_argument("--threshold", type=float, help="delta: DiCache skip threshold / plan+probe veto threshold")
    group.add_argument("--probe-depth", type=int, help="m, the probe's number of leading blocks (default 1)")
    group.add_argument("--error", choices=["delta_y", "delta_minus"], help="DiCache error indicator")
    group.add_argument("--warmup-ratio", type=float, help="DiCache warm-up ratio r")
    group.add_argument("--gamma-max", type=float, help="DiCache upper clip of gamma")
    group.add_argument(
        "--batch-global",
        action="store_true",
        default=None,
        help="one decision for the whole batch (official) instead of per sample",
    )
    group.add_argument(
        "--step-reuse",
        choices=["state", "residual"],
        help="plan: a step-cached step reuses H (official, the default) or adds the residual H - x to the current "
        "input",
    )


def _dicache_presets() -> list[str]:
    from ..dicache import PRESETS

    return sorted(PRESETS)


def chosen_policy(args) -> str | None:
    """The policy the options ask for (``None``: full compute); an option that does not apply to it is an error."""
    policy = args.policy or ("plan" if args.plan else None)
    for dest, policies in APPLIES_TO.items():
        if getattr(args, dest) is not None and policy not in policies:
            option = "--" + dest.replace("_", "-")
            raise ValueError(
                f"{option} does not apply to {f'--policy {policy}' if policy else 'full compute (no --policy)'}; "
                f"it is an option of --policy {' / '.join(policies)}."
            )
    return policy


def planned_steps(args, config) -> int | None:
    """``--steps``, else the plan's step count (``None``: neither); a ``--steps`` other than the plan's is refused."""
    plan = getattr(config, "plan", None)
    steps = args.steps or (plan.num_inference_steps if plan else None)
    if plan is not None and steps != plan.num_inference_steps:
        raise ValueError(f"--steps {steps} does not match the plan's {plan.num_inference_steps} steps ({args.plan}).")
    return steps


def policy_config(args, family: str):
    """The config to pass to ``invardiff.enable`` (``None``: full compute), from the options above."""
    from ..dicache import DiCacheConfig, PlanProbeConfig
    from ..expert_plans import ExpertPlans, load_plan
    from ..families import get_family
    from ..policies.plan import PlanConfig

    policy = chosen_policy(args)
    if policy is None:
        return None
    if policy in ("plan", "plan+probe") and not args.plan:
        raise ValueError(f"--policy {policy} needs --plan PLAN.json (make one with `invardiff calibrate`).")
    plan = load_plan(args.plan) if args.plan else None
    if isinstance(plan, ExpertPlans):
        # generate, demo and bench run one policy on one transformer; a pair is for invardiff.enable.
        raise ValueError(
            f"{args.plan} holds one plan per expert ({', '.join(plan)}) of a pipeline that switches transformers "
            f"along the schedule (Wan2.2); the CLI's generate, demo and bench run one plan on one transformer. "
            f"Pass the pair to invardiff.enable(pipe, invardiff.load_plan(PATH)) on its pipeline, or give a plan "
            f"calibrated on a one-transformer model."
        )
    if policy == "plan":
        return PlanConfig(plan, step_reuse=args.step_reuse or "state")
    overrides = {
        "probe_depth": args.probe_depth,
        "error": args.error,
        "per_sample": False if args.batch_global else None,
    }
    if policy == "plan+probe":
        if args.threshold is None:
            raise ValueError("--policy plan+probe needs --threshold DELTA (the veto threshold; try 0.3).")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return PlanProbeConfig(plan, threshold=args.threshold, **overrides)
    overrides.update(threshold=args.threshold, warmup_ratio=args.warmup_ratio, gamma_max=args.gamma_max)
    preset = args.dicache_preset or get_family(family).dicache_preset
    return DiCacheConfig.preset(preset, **{k: v for k, v in overrides.items() if v is not None})
