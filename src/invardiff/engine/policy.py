"""Policies decide, per step and per reusable unit, whether to compute or reuse; the engine executes the decision.

A policy is built from a config by the function registered for the config's type (``register_policy``), so that a
new policy (DiCache comes next) plugs into the same hooks without touching ``enable``/``disable``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..families import FamilySpec
from ..plan import CachePlan, PlanError
from ..stats import unit_reuse


class CachePolicy:
    """Per-run decisions, read by the engine's hooks through plain Python lists (the hot path stays cheap).

    ``step_cached[t]``: run only the conditioning and the head on the cached pre-head hidden state.
    ``keep_hidden_after[t]``: keep H after step ``t`` because a later step reuses it before H is next computed.
    ``unit_reuse[u][t]`` / ``unit_keep_after[u][t]``: the same for reusable unit ``u`` (engine unit order).
    """

    name: str = "policy"
    uses_units: bool = True  # False: no layer-wise reuse, so the unit hooks are not installed
    step_reuse: str = "state"  # what a step-cached step reuses: H itself, or the residual H - x (PlanConfig)
    num_steps: int | None
    step_cached: list[bool]
    keep_hidden_after: list[bool]
    unit_reuse: list[list[bool]]
    unit_keep_after: list[list[bool]]

    def check_num_steps(self, num_steps: int) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


_POLICY_BUILDERS: dict[type, Callable] = {}


def register_policy(config_cls: type):
    """Register ``builder(config, family, transformer, units) -> CachePolicy`` for configs of ``config_cls``."""

    def decorator(builder: Callable) -> Callable:
        _POLICY_BUILDERS[config_cls] = builder
        return builder

    return decorator


def build_policy(config, family: FamilySpec, transformer: torch.nn.Module, units) -> CachePolicy:
    builder = _POLICY_BUILDERS.get(type(config))
    if builder is None:
        known = ", ".join(cls.__name__ for cls in _POLICY_BUILDERS) or "none"
        raise TypeError(f"Unsupported cache config {type(config).__name__}; expected a CachePlan or one of: {known}.")
    return builder(config, family, transformer, units)


STEP_REUSE = ("state", "residual")


@dataclass(frozen=True)
class PlanConfig:
    """Execute a fixed :class:`CachePlan` step-first, then layer-wise (InvarDiff, SPEC.md A.4).

    Args:
        plan (`CachePlan`): the plan; it must match the model's family and depth and the run's step count.
        step_reuse (`str`): what a step-cached step reuses. ``"state"`` (official, SPEC.md A.4 and C.1 item 9):
            the last computed pre-head hidden state H itself; the current latent is ignored. ``"residual"``: the
            last computed residual H - x added to the current step's block-stack input x (the patch embedding of
            the current latent, one extra embedding per step), so a reused step follows the latent like
            TeaCache / MagCache do. Same speed; a deviation from the official code, off by default.
    """

    plan: CachePlan
    step_reuse: str = "state"

    def __post_init__(self):
        if self.step_reuse not in STEP_REUSE:
            raise ValueError(f"step_reuse must be one of {STEP_REUSE}, got {self.step_reuse!r}.")


class PlanPolicy(CachePolicy):
    name = "plan"

    def __init__(self, plan: CachePlan, units, step_reuse: str = "state"):
        self.plan = plan
        self.step_reuse = step_reuse
        self.num_steps = plan.num_inference_steps
        executed = ~plan.step_cache
        self.step_cached = plan.step_cache.tolist()
        # H is kept only while the next step is step-cached (SPEC.md A.4: state reuse of the last computed H).
        self.keep_hidden_after = np.append(plan.step_cache[1:], False).tolist()
        effective = {facts.name: unit_reuse(plan, facts.name) for facts in plan.model.block_lists}
        self.unit_reuse, self.unit_keep_after = [], []
        for unit in units:
            reuse = effective[unit.block_list][unit.name][:, unit.layer] & executed
            self.unit_reuse.append(reuse.tolist())
            self.unit_keep_after.append(_keep_after(reuse, executed).tolist())

    def check_num_steps(self, num_steps: int) -> None:
        self.plan.check_num_steps(num_steps)

    def describe(self) -> dict:
        return {"policy": self.name, "step_reuse": self.step_reuse, "provenance": self.plan.provenance}


def _keep_after(reuse: np.ndarray, executed: np.ndarray) -> np.ndarray:
    # After executed step t, the output is needed iff the next executed step reuses it; otherwise that step
    # recomputes (or the run ends) and the memory can go right away.
    keep = np.zeros_like(reuse)
    steps = np.flatnonzero(executed)
    keep[steps[:-1]] = reuse[steps[1:]]
    return keep


def check_plan_fits(plan: CachePlan, family: FamilySpec, transformer) -> None:
    """Raise unless ``plan`` is a CachePlan for this family and these layer counts."""
    if not isinstance(plan, CachePlan):
        raise TypeError(f"The plan must be a CachePlan, got {type(plan).__name__}.")
    try:
        plan.check_model(family.name, family.num_layers(transformer))
    except PlanError as error:
        raise PlanError(f"{error} (model: {type(transformer).__name__})") from None


@register_policy(PlanConfig)
def _build_plan_policy(config: PlanConfig, family: FamilySpec, transformer, units) -> PlanPolicy:
    check_plan_fits(config.plan, family, transformer)
    if config.step_reuse == "residual" and family.embed_input is None:
        raise ValueError(f"step_reuse='residual' is not available for the {family.name} family (no embed_input).")
    return PlanPolicy(config.plan, units, config.step_reuse)
