"""The InvarDiff plan policy: a fixed :class:`CachePlan`, executed step-first, then layer-wise (SPEC.md A.4)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.policy import CachePolicy, StepAction, register_policy
from ..engine.storage import CacheCodec
from ..families import FamilySpec
from ..plan import CachePlan, PlanError
from ..stats import unit_reuse
from .extrapolation import StepExtrapolation, extrapolate, history, history_after, unit_coefficients


logger = logging.getLogger(__name__)

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
        resample_steps (`bool`, defaults to `False`): when a pipeline call has another step count than the plan,
            run :func:`invardiff.plan_transforms.resample_plan` of the plan for that count (logged as a warning)
            instead of refusing the call. Quicker than recalibrating, usually less faithful.
    """

    plan: CachePlan
    step_reuse: str = "state"
    resample_steps: bool = False

    def __post_init__(self):
        if self.step_reuse not in STEP_REUSE:
            raise ValueError(f"step_reuse must be one of {STEP_REUSE}, got {self.step_reuse!r}.")
        extrapolated = isinstance(self.plan, CachePlan) and self.plan.step_extrapolation_order().any()
        if self.step_reuse == "residual" and extrapolated:
            raise ValueError(
                "The plan extrapolates reused steps (step_extrapolation, fitted on H) but step_reuse='residual' "
                "reuses H - x; use step_reuse='state' with this plan."
            )


class PlanPolicy(CachePolicy):
    """Decisions read from per-step Python lists made once at enable time: the hot path is a list lookup.

    ``step_cached[t]``: run only the conditioning and the head on the cached pre-head hidden state.
    ``keep_hidden_after[t]``: keep H after step ``t`` because a later step reuses it before H is next computed.
    ``unit_reuse[t][u]`` / ``unit_keep[t][u]``: the same for reusable unit ``u`` (engine unit order).

    Extrapolation (plan format version 2, see ``extrapolation.py``): where a reuse run has a nonzero coefficient,
    its anchor keeps the pair of the last two computed values and the reuse returns one ``torch.lerp`` of them; a
    zero coefficient returns the anchor itself, so a plan without coefficients runs exactly as before. A
    second-order step coefficient (version 4) keeps the last three computed H and rebuilds with two lerps.

    Cache storage dtype (plan format version 3, ``engine/storage.py``): kept values are encoded as they are kept and
    decoded as they are reused; a plan without one keeps the outputs themselves.
    """

    name = "plan"
    uses_units = True

    def __init__(self, plan: CachePlan, units, step_reuse: str = "state", embed_input=None, resample=False):
        self.step_reuse = step_reuse
        self.embed_input = embed_input  # embed_input(call): the block-stack input x, for residual step reuse
        self.units = units
        self.original_plan = plan if resample else None  # what to resample from when the step count changes
        self._load(plan)

    def _load(self, plan: CachePlan) -> None:
        self.plan = plan
        self.codec = CacheCodec(plan.cache_dtype) if plan.cache_dtype else None
        units = self.units
        self.num_steps = plan.num_inference_steps
        executed = ~plan.step_cache
        self.step_cached = plan.step_cache.tolist()
        # H is kept only while the next step is step-cached (SPEC.md A.4: state reuse of the last computed H), or
        # as the earlier value of an extrapolation pair.
        steps = StepExtrapolation(plan)
        self.step_coefficient, self.step_second = steps.coefficient, steps.second
        self.hidden_history, self.keep_hidden_after = steps.history_after, steps.keep_after
        effective = {facts.name: unit_reuse(plan, facts.name) for facts in plan.model.block_lists}
        coefficients = unit_coefficients(plan, units)  # (T, U)
        reuse = np.zeros((self.num_steps, len(units)), dtype=bool)
        keep = np.zeros_like(reuse)
        length = np.zeros(reuse.shape, dtype=int)
        for index, unit in enumerate(units):
            reuse[:, index] = effective[unit.block_list][unit.name][:, unit.layer] & executed
            orders = (coefficients[:, index] != 0).astype(int)  # units extrapolate at first order only
            length[:, index] = history_after(reuse[:, index], executed, orders)
            keep[:, index] = _keep_after(reuse[:, index] | (length[:, index] >= 2), executed)
        self.unit_reuse, self.unit_keep = reuse.tolist(), keep.tolist()
        self.unit_coefficient, self.unit_history = coefficients.tolist(), length.tolist()

    def start_run(self, num_steps: int) -> None:
        if self.original_plan is not None and num_steps != self.num_steps:
            from ..plan_transforms import resample_plan

            original = self.original_plan
            if num_steps == original.num_inference_steps:
                self._load(original)
                return
            plan = resample_plan(original, num_steps)
            logger.warning(
                "invardiff: the plan for %d steps runs a %d-step call: resampled on the time axis "
                "(resample_steps=True); recalibrate at %d steps for the measured plan.",
                original.num_inference_steps,
                num_steps,
                num_steps,
            )
            self._load(plan)
        self.plan.check_num_steps(num_steps)

    def steps_needed(self) -> int | None:
        return None if self.original_plan is not None else self.plan.num_inference_steps

    def begin_step(self, state) -> StepAction:
        return StepAction.REUSE if self.step_cached[state.step] else StepAction.COMPUTE

    def unit_actions(self, state):
        return self.unit_reuse[state.step], self.unit_keep[state.step]

    def reused_hidden(self, transformer, state) -> torch.Tensor:
        if state.hidden is None:
            raise RuntimeError(f"invardiff: the plan reuses step {state.step} but no hidden state is cached.")
        hidden = self.codec.decode(state.hidden) if self.codec is not None else state.hidden
        if self.step_reuse == "residual":  # the kept value is the residual H - x
            return self.embed_input(state.call) + hidden
        return extrapolate(hidden, self.step_coefficient[state.step], self.step_second[state.step])

    def unit_to_keep(self, state, unit: int, output):
        length = self.unit_history[state.step][unit]
        if length >= 2:  # a later reuse extrapolates from (previous output, this output)
            return history(state.units[unit], output, length)
        kept = super().unit_to_keep(state, unit, output)
        return self.codec.encode(kept) if self.codec is not None else kept

    def reused_unit(self, state, unit: int, cached):
        if self.codec is not None:  # plans with a cache dtype have no extrapolation (CachePlan refuses both)
            return self.codec.decode(cached)
        return extrapolate(cached, self.unit_coefficient[state.step][unit])

    def head_input(self, state, hidden):
        return hidden, self._kept_hidden(state, hidden)

    def _kept_hidden(self, state, hidden):
        if not self.keep_hidden_after[state.step]:
            return None
        if self.step_cached[state.step]:
            return state.hidden  # a reused step: the kept value (H, R or an extrapolation pair) carries on
        value = hidden if self.step_reuse == "state" else hidden - self.embed_input(state.call)  # R = H - x
        length = self.hidden_history[state.step]
        if length >= 2:  # a later reuse extrapolates from this H and the one (or two) before it
            return history(state.hidden, value, length)
        return self.codec.encode(value) if self.codec is not None else value

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
    embed = None if family.embed_input is None else (lambda call: family.embed_input(transformer, call))
    return PlanPolicy(config.plan, units, config.step_reuse, embed, config.resample_steps)


@register_policy(CachePlan)
def _build_from_plan(plan: CachePlan, family: FamilySpec, transformer, units) -> PlanPolicy:
    return _build_plan_policy(PlanConfig(plan), family, transformer, units)
