"""A fixed-interval step skipper: compute every ``interval``-th step, reuse (or extrapolate) the others.

The simplest online baseline users ask for (uniform step caching as in DeepCache / Delta-DiT, and TaylorSeer's
first-order prediction at the step level): it needs no calibration and follows any step count. A skipped step runs
only the conditioning and the output head, like a plan's step-cached step, on either the last computed pre-head
hidden state H (``order=0``) or its first-order extrapolation from the last two computed steps (``order=1``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..engine.policy import CachePolicy, StepAction, register_policy
from ..engine.state import tensor_bytes


@dataclass(frozen=True)
class IntervalConfig:
    """Compute the first ``warmup_steps`` steps, then every ``interval``-th step, and (optionally) the last one.

    A skipped step costs only the conditioning and the head, so the ideal speedup approaches ``interval``; the
    larger the interval, the faster and the further from full compute. ``order=1`` extrapolates H linearly in the
    step index from the last two computed steps instead of repeating the last one: same cost, one more H held.

    Args:
        interval (`int`): compute one step in ``interval`` after the warm-up; 1 computes every step.
        warmup_steps (`int`): leading steps always computed (the early steps change the image most).
        compute_last (`bool`): always compute the last step.
        order (`int`): 0 reuses the last computed H; 1 extrapolates from the last two computed H.
        num_inference_steps (`int`, *optional*): the run's step count; read from the scheduler when left out
            (manual loops must give it).
    """

    interval: int
    warmup_steps: int = 2
    compute_last: bool = True
    order: int = 0
    num_inference_steps: int | None = None

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(
                f"warmup_steps must be an integer >= 1 (step 0 has nothing to reuse), got {self.warmup_steps!r}."
            )
        if self.order not in (0, 1):
            raise ValueError(f"order must be 0 (reuse) or 1 (first-order extrapolation), got {self.order!r}.")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")

    def computes(self, step: int, num_steps: int) -> bool:
        after_warmup = step - self.warmup_steps
        return after_warmup < 0 or after_warmup % self.interval == 0 or (self.compute_last and step == num_steps - 1)


class _Computed:
    """The last two computed pre-head states of one branch, with their step indices."""

    def __init__(self):
        self.last = self.previous = None
        self.last_step = self.previous_step = None


class IntervalPolicy(CachePolicy):
    name = "interval"

    def __init__(self, config: IntervalConfig):
        self.config = config
        self.num_steps = config.num_inference_steps

    def start_run(self, num_steps: int) -> None:
        fixed = self.config.num_inference_steps
        if fixed is not None and num_steps != fixed:
            raise ValueError(
                f"The pipeline runs {num_steps} steps but the interval config says num_inference_steps={fixed}; "
                f"leave num_inference_steps unset to follow the scheduler."
            )
        self.num_steps = num_steps

    def steps_needed(self) -> int | None:
        return self.config.num_inference_steps

    def new_branch(self, state) -> _Computed:
        return _Computed()

    def begin_step(self, state) -> StepAction:
        computes = self.config.computes(state.step, self.num_steps)
        return StepAction.COMPUTE if computes else StepAction.REUSE

    def reused_hidden(self, transformer, state) -> torch.Tensor:
        computed = state.policy_state
        if self.config.order == 0 or computed.previous is None:
            return computed.last
        slope = (state.step - computed.last_step) / (computed.last_step - computed.previous_step)
        return computed.last + slope * (computed.last - computed.previous)

    def head_input(self, state, hidden):
        if state.action == StepAction.COMPUTE:
            computed = state.policy_state
            if self.config.order == 1:
                computed.previous, computed.previous_step = computed.last, computed.last_step
            computed.last, computed.last_step = hidden, state.step
        return hidden, None

    def held_bytes(self, policy_state: _Computed) -> int:
        return tensor_bytes([policy_state.last, policy_state.previous])

    def drop_tensors(self, policy_state: _Computed) -> None:
        policy_state.last = policy_state.previous = None

    def describe(self) -> dict:
        return {"policy": self.name, **dataclasses.asdict(self.config)}


@register_policy(IntervalConfig)
def _build_interval_policy(config: IntervalConfig, family, transformer, units) -> IntervalPolicy:
    return IntervalPolicy(config)
