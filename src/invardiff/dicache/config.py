"""Configs of the two probe policies: DiCache (SPEC.md Part B) and plan+probe (an InvarDiff plan vetoed online).

Both are plain frozen dataclasses handed to :func:`invardiff.enable`; their builders are registered with
``register_policy`` in ``policy.py``. The official per-model settings (SPEC.md B.5) are named presets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..families import LazyTable, families
from ..plan import CachePlan


ERRORS = ("delta_y", "delta_minus")
COMPARISONS = ("<", "<=")
WARMUP_COUNTERS = ("steps", "calls")
# The official WAN pipeline calls the transformer twice per step, the conditional branch first (SPEC.md B.2): a
# branch's position here is its call's position within the step. A call outside a named context counts as "cond".
CALL_ORDER = ("cond", "uncond")


def _check_probe_settings(threshold, probe_depth, error, skip_when, allow_inf: bool = False) -> None:
    if math.isnan(threshold) or threshold < 0 or (math.isinf(threshold) and not allow_inf):
        raise ValueError(f"threshold (delta) must be a finite number >= 0, got {threshold}.")
    if not isinstance(probe_depth, int) or probe_depth < 1:
        raise ValueError(f"probe_depth must be an integer >= 1 (the official default is 1), got {probe_depth!r}.")
    if error not in ERRORS:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}.")
    if skip_when not in COMPARISONS:
        raise ValueError(f"skip_when must be one of {COMPARISONS}, got {skip_when!r}.")


@dataclass(frozen=True)
class DiCacheConfig:
    """DiCache: skip the deep layers while a shallow probe's accumulated change stays under ``threshold``.

    Every post-warm-up step runs the first ``probe_depth`` blocks, adds the probe's relative L1 change to an
    accumulator and, while it stays under ``threshold``, skips the rest of the network: the output is the last
    computed residual extrapolated along the probe's trajectory (gamma in ``[1, gamma_max]``). A computed step
    resumes from the probe's state and resets the accumulator. A larger threshold skips more steps: faster, further
    from full compute. A skipped step costs the probe blocks and the head (1/57 of FLUX.1-dev's blocks at depth 1).

    Args:
        threshold (`float`): delta; skip while the accumulator compares under it (official FLUX default 0.4).
        num_inference_steps (`int`, *optional*): the run's step count. With a pipeline it may be left out and is
            read from the scheduler at every call; manual loops must give it (warm-up and the last step need it).
        probe_depth (`int`): m, the number of leading blocks of the first block list that form the probe.
        error (`str`): ``"delta_y"`` (probe change) or ``"delta_minus"`` (|probe change - input change|).
        warmup_ratio (`float`): r; the counter's first ``floor(r * total)`` values (and, when ``warmup_inclusive``,
            the next one) are always computed.
        warmup_inclusive (`bool`): FLUX's ``counter <= floor(r * total)`` (True) or WAN/HunyuanVideo's ``<``.
        warmup_counter (`str`): what the warm-up counts, as the official code's counter does. ``"steps"`` (FLUX,
            HunyuanVideo, DiT: one call per step, total N): a branch warms up at the same steps as every other.
            ``"calls"`` (WAN): the counter ticks at every transformer call, two a step, the conditional call then
            the unconditional one (total 2N), so at step k the branch "cond" is at call 2k and "uncond" at 2k + 1;
            when ``floor(r * 2N)`` is odd the conditional branch warms up one step longer. A branch's warm-up does
            not depend on how the branches are called: alone, as two calls, or batched (``batch_branches``).
        batch_branches (`tuple[str, ...]`, *optional*): for ``warmup_counter="calls"`` with a call that holds both
            branches (one ``cache_context``, or none): the branch of each equal part of the batch in batch order,
            e.g. ``("cond", "uncond")`` when the conditional samples come first. Each part then warms up as its
            branch's official call would (give every sample its own decisions with ``per_sample=True``). Unset, a
            call outside a ``"cond"``/``"uncond"`` context counts as the conditional call.
        add_input_last (`bool`): the order of the extrapolation's additions: ``x + (W_beta + gamma (W_alpha -
            W_beta))`` (True: FLUX's and WAN's official ``x += ...``) or ``(x + W_beta) + gamma (W_alpha - W_beta)``
            (False: HunyuanVideo's official ``x + W_beta + ...``). Equal in exact arithmetic; the rounding differs.
        force_last_step (`bool`): always compute the last step (FLUX).
        skip_when (`str`): ``"<"`` (FLUX, WAN) or ``"<="`` (HunyuanVideo): the comparison of accumulator and delta.
        gamma_max (`float`): upper clip of the extrapolation step (1.5 FLUX/HunyuanVideo, 2 WAN).
        per_sample (`bool`): each sample of a batch keeps its own accumulator, windows and decision, and the deep
            layers run only on the samples that compute. False reproduces the official batch-global decision
            (all statistics are means over the whole batch).
    """

    threshold: float
    num_inference_steps: int | None = None
    probe_depth: int = 1
    error: str = "delta_y"
    warmup_ratio: float = 0.2
    warmup_inclusive: bool = True
    force_last_step: bool = True
    skip_when: str = "<"
    gamma_max: float = 1.5
    per_sample: bool = True
    warmup_counter: str = "steps"
    batch_branches: tuple[str, ...] | None = None
    add_input_last: bool = True

    def __post_init__(self):
        _check_probe_settings(self.threshold, self.probe_depth, self.error, self.skip_when)
        if self.warmup_counter not in WARMUP_COUNTERS:
            raise ValueError(f"warmup_counter must be one of {WARMUP_COUNTERS}, got {self.warmup_counter!r}.")
        if self.batch_branches is not None:
            branches = self.batch_branches
            if isinstance(branches, str) or not branches or any(b not in CALL_ORDER for b in branches):
                raise ValueError(
                    f"batch_branches must be a tuple of branch names from {CALL_ORDER} in batch order, e.g. "
                    f"('cond', 'uncond'), got {branches!r}."
                )
            if self.warmup_counter != "calls":
                raise ValueError(
                    "batch_branches sets the warm-up of each part of a batched call under warmup_counter='calls'; "
                    "with warmup_counter='steps' every branch warms up alike. Set warmup_counter='calls' or leave "
                    "batch_branches unset."
                )
            object.__setattr__(self, "batch_branches", tuple(branches))  # a list from JSON compares equal
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}.")
        if not (math.isfinite(self.gamma_max) and self.gamma_max >= 1.0):
            raise ValueError(
                f"gamma_max must be a finite number >= 1 (gamma is clipped to [1, gamma_max]), got {self.gamma_max}."
            )
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")

    @classmethod
    def preset(cls, name: str, **overrides) -> DiCacheConfig:
        """An official setting of SPEC.md B.5 (``flux``, ``flux-delta-minus``, ``hunyuanvideo``, ``wan2.1``),
        with any field overridden, e.g. ``DiCacheConfig.preset("flux", threshold=0.2)``."""
        if name not in PRESETS:
            raise ValueError(f"Unknown DiCache preset {name!r}; expected one of {sorted(PRESETS)}.")
        return replace(PRESETS[name], **overrides)

    def is_warmup(self, step: int, num_steps: int, branch: str = "cond") -> bool:
        """Whether ``step`` of ``branch`` (a name of :data:`CALL_ORDER`) is always computed in an ``num_steps``-step
        run: the official counter (a step, or WAN's call count) against ``floor(warmup_ratio * total)``."""
        if self.warmup_counter == "calls":
            counter, total = len(CALL_ORDER) * step + CALL_ORDER.index(branch), len(CALL_ORDER) * num_steps
        else:
            counter, total = step, num_steps
        boundary = math.floor(self.warmup_ratio * total)  # the official int(num_steps * ret_ratio)
        return counter <= boundary if self.warmup_inclusive else counter < boundary

    def is_forced(self, step: int, num_steps: int) -> bool:
        return self.force_last_step and step == num_steps - 1


# SPEC.md B.5. DiT has no official DiCache setting; its default (``FamilySpec.dicache_preset``) uses FLUX's rules.
PRESETS = {
    "flux": DiCacheConfig(threshold=0.4),
    "flux-delta-minus": DiCacheConfig(threshold=0.08, error="delta_minus", warmup_ratio=0.0),
    "hunyuanvideo": DiCacheConfig(
        threshold=0.1,
        warmup_inclusive=False,
        force_last_step=False,
        skip_when="<=",
        gamma_max=1.5,
        add_input_last=False,
    ),
    "wan2.1": DiCacheConfig(
        threshold=0.08, warmup_inclusive=False, force_last_step=False, gamma_max=2.0, warmup_counter="calls"
    ),
}
# Each family's default preset (``FamilySpec.dicache_preset``), by family name.
FAMILY_DEFAULT_PRESET = LazyTable(lambda: {spec.name: spec.dicache_preset for spec in families()})


@dataclass(frozen=True)
class PlanProbeConfig:
    """plan+probe: an InvarDiff plan proposes which steps to reuse; a DiCache probe vetoes a reuse online.

    On the plan's compute steps nothing changes (layer-wise reuse included), and the probe output is recorded for
    free. On a step the plan step-caches, the first ``probe_depth`` blocks run and their relative L1 change is
    accumulated since the last computed step; while it stays under ``threshold`` the plan's reuse (the last
    computed pre-head hidden state) stands, otherwise the step is computed (resuming from the probe), per sample
    when ``per_sample``. Each vetoed step buys fidelity with one step of compute; each accepted step costs the
    probe blocks on top of the plan.

    Args:
        plan (`CachePlan`): the plan that proposes reuse, without extrapolation coefficients (format version 1).
        threshold (`float`): delta of the veto; ``inf`` accepts every proposal (the plan plus the probe's cost).
        probe_depth, error, skip_when, per_sample: as in :class:`DiCacheConfig`.
    """

    plan: CachePlan
    threshold: float
    probe_depth: int = 1
    error: str = "delta_y"
    skip_when: str = "<"
    per_sample: bool = True

    def __post_init__(self):
        if not isinstance(self.plan, CachePlan):
            raise TypeError(f"PlanProbeConfig.plan must be a CachePlan, got {type(self.plan).__name__}.")
        if self.plan.extrapolates:
            # A bad argument, refused when the config is made (not when it is enabled, mid-command): such a plan
            # can only be used alone.
            raise ValueError(
                "plan+probe takes a plan without extrapolation coefficients (format version 1), got one with them: "
                "the probe's vetoes would change which values the coefficients were fitted for. Use the plan alone "
                "(policy plan), or search a plan without extrapolation (calibrate --budget, --extrapolate none)."
            )
        if self.plan.cache_dtype is not None:
            raise ValueError(
                f"plan+probe keeps its cache in the model's dtype; this plan sets cache_dtype "
                f"{self.plan.cache_dtype!r} (format version 3). Use the plan alone (policy plan), or a plan without "
                f"a cache_dtype."
            )
        _check_probe_settings(self.threshold, self.probe_depth, self.error, self.skip_when, allow_inf=True)
