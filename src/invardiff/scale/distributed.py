"""Consistent cache decisions when one generation is split over ranks (context parallelism, torch.distributed).

Under context (sequence) parallelism each rank of a group holds a shard of every sample's tokens, and the deep
layers exchange keys and values inside their attention. A cache decision taken from a rank's own shard would
differ between ranks, and a rank that skipped the deep layers would leave the others waiting in their collectives.
So:

* plan policies need no communication: the plan decides from the step index alone. :func:`enable_context_parallel`
  checks once that every rank of the group enables the same policy (a digest of the plan and settings);
* DiCache and plan+probe reduce their per-sample statistics over the group: every mean ``mean|a - b|`` is a sum
  and an element count on each rank, and all of a step's sums (the probe change, the input change for
  ``delta_minus``, gamma's numerator and denominator, a flag for non-finite residual windows) travel in ONE
  all-reduce, after which every rank computes the same numbers and the same decision. NaN sums stay NaN after the
  reduction on every rank, so a NaN sample on one shard makes every rank compute it (``non_finite``): no rank
  leaves the collective sequence early and none hangs;
* a family whose pre-head state packs several token streams (LTX-2's video and audio) is refused with
  ``NotImplementedError`` (:func:`refuse_several_streams` says why).

The reduction runs over the group passed in, never over WORLD: data-parallel replicas (different prompts) must not
tie their decisions together, and under CFG parallelism (the two guidance branches on different ranks) each branch
keeps its own decision by giving each branch's context-parallel group.

Cost: one all-reduce of ``(k, B)`` float64 values per probed step (k <= 7), next to the attention's collectives.
The reduced means are sums of per-shard float32 sums, so they can differ from the single-device means in the last
bits; a decision can then differ from an unsharded run's only when an accumulator lands within rounding of delta.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
import torch.distributed as dist

from .. import api
from ..dicache.estimators import EPS, gamma_from_means
from ..dicache.probe import ProbePolicy
from ..engine.install import attached_engine
from ..families import resolve_family
from ..plan import CachePlan


def policy_digest(config) -> str:
    """SHA-256 of a policy config: the plan's content and every setting (equal on ranks that decide alike)."""

    def payload(value):
        if isinstance(value, CachePlan):
            return {"plan": value.to_dict()}
        if dataclasses.is_dataclass(value):
            fields = {f.name: payload(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return {"type": type(value).__name__, **fields}
        if isinstance(value, dict):  # one config per expert (Wan2.2)
            return {str(key): payload(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [payload(item) for item in value]
        return value

    text = json.dumps(payload(config), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_policy(config, group) -> None:
    """Raise on every rank of ``group`` unless all of them hold the same policy (one all-gather)."""
    digests = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, policy_digest(config), group=group)
    if len(set(digests)) > 1:
        ranks = {dist.get_global_rank(group, index): digest[:12] for index, digest in enumerate(digests)}
        raise ValueError(
            f"The ranks of the context-parallel group enable different cache policies (policy digest by global "
            f"rank: {ranks}). Every rank of one generation must enable the same plan and settings: load the same "
            f"plan file and pass the same config on every rank."
        )


def enable_context_parallel(target, config, group) -> None:
    """:func:`invardiff.enable` on one rank of a context-parallel ``group`` (a ``torch.distributed`` process group
    whose ranks share one generation, each with a shard of the tokens).

    Checks that every rank of the group enables the same policy, then enables it; a probe policy (DiCache,
    plan+probe) then reduces its statistics over ``group`` at every step, so all ranks decide alike. Call it on
    every rank of the group, in the same order as the group's other collectives.

    Args:
        target: the pipeline or transformer of this rank.
        config: the policy config (a plan, :class:`DiCacheConfig`, :class:`PlanProbeConfig`, ...).
        group: the context-parallel process group. Required: the reduction never defaults to WORLD, where
            data-parallel replicas would tie their decisions together.
    """
    if group is None or group is dist.GroupMember.WORLD:
        raise ValueError(
            "enable_context_parallel needs the context-parallel process group (the ranks that share one "
            "generation), got WORLD or None. Create it with torch.distributed.new_group(ranks) or take it from your "
            "device mesh (e.g. mesh.get_group('cp')); with a single group spanning all ranks, pass "
            "torch.distributed.new_group(list(range(world_size)))."
        )
    for transformer in api.transformers_of(target):  # before any collective: every rank raises alike
        refuse_several_streams(transformer)
    check_same_policy(config, group)
    api.enable(target, config)
    for transformer in api.transformers_of(target):  # each expert of a two-expert pipeline has its own policy
        policy = attached_engine(transformer).policy
        if isinstance(policy, ProbePolicy):
            policy.context_parallel = ContextParallelReduction(group)


def refuse_several_streams(transformer) -> None:
    """Raise ``NotImplementedError`` for a family whose pre-head state packs several token streams (LTX-2).

    Its streams are not sharded alike: diffusers' context-parallel plan for ``LTX2VideoTransformer3DModel``
    splits the video tokens over the ranks and leaves the audio tokens whole on every rank. The probe policies'
    group sums would then count the replicated stream once per rank (their decisions, though equal on every rank,
    would not be the unsharded run's), and a step-cached step would unpack this rank's packed state with the call's
    stream shapes; neither is handled yet."""
    spec = resolve_family(transformer)
    streams = spec.head_streams
    if streams is None:
        return
    split = getattr(type(transformer), "_cp_plan", None) or {}
    sharded = [name for name in streams.arguments if name in split.get("", {})]
    raise NotImplementedError(
        f"enable_context_parallel does not support the {spec.name!r} family yet: its pre-head state packs the "
        f"token streams {', '.join(streams.arguments)} into one tensor, and diffusers' context-parallel plan for "
        f"{type(transformer).__name__} shards {', '.join(sharded) or 'none of them'} and replicates the rest on "
        f"every rank, so the group's statistics would count a replicated stream once per rank. Run this family "
        f"without context parallelism (invardiff.enable on one device)."
    )


class ContextParallelReduction:
    """The probe policies' statistics summed over a context-parallel group, in one all-reduce per step."""

    def __init__(self, group):
        self.group = group

    def reduce(self, policy: ProbePolicy, branch, block_input, probe, needed: bool):
        """Called by :meth:`ProbePolicy.decide` at every probed step on every rank. Applies the window resets any
        rank recorded, and when ``needed`` returns the group's ``(error float32, gamma float64)``, each ``(B,)``."""
        config = policy.config
        pairs = []  # (a, b): the means mean|a - b| and mean|b| or mean|a - b| of the statistics, see below
        if needed:
            pairs.append((probe, branch.probe_prev))
            if config.error == "delta_minus":
                pairs.append((block_input, branch.block_input_prev))
        windows = needed and policy.reuse == "extrapolate" and branch.probe_alpha is not None
        if windows:
            pairs.append((probe - block_input, branch.probe_beta))  # gamma numerator: |r - w_beta|
            pairs.append((branch.probe_alpha, branch.probe_beta))  # gamma denominator: |w_alpha - w_beta|
        rows = []
        for index, (current, previous) in enumerate(pairs):
            rows.append(_abs_sum(current.float() - previous.float()))  # (B,)
            if index < len(pairs) - (2 if windows else 0):  # relative changes also need mean|previous|
                rows.append(_abs_sum(previous))
            count = float(current[0].numel())  # this shard's elements per sample
            rows.append(torch.full((branch.batch,), count, dtype=torch.float64, device=probe.device))
        reset = branch.pending_reset
        rows.append(torch.zeros(branch.batch, device=probe.device) if reset is None else reset)
        packed = torch.stack([row.double() for row in rows])  # (k, B)
        dist.all_reduce(packed, group=self.group)  # the one collective of the step
        branch.computed_steps = torch.where(packed[-1] > 0, 0, branch.computed_steps)
        branch.pending_reset = None
        if not needed:
            return None
        return self._statistics(policy, branch, packed[:-1], windows)

    @staticmethod
    def _statistics(policy, branch, sums: torch.Tensor, windows: bool):
        config = policy.config
        if not config.per_sample:  # batch-global: sums over the batch too, broadcast back to every sample
            sums = sums.sum(dim=1, keepdim=True).expand(-1, branch.batch)
        relative = []
        row = 0
        for _ in range(2 if config.error == "delta_minus" else 1):
            change, previous, count = sums[row : row + 3]
            relative.append((change / count) / (previous / count + EPS))
            row += 3
        error = relative[0] if len(relative) == 1 else (relative[0] - relative[1]).abs()
        gamma = torch.ones(branch.batch, dtype=torch.float64, device=sums.device)
        if windows:
            numerator, count_n, denominator, count_d = sums[row : row + 4]
            value = gamma_from_means(numerator / count_n, denominator / count_d, policy.gamma_max)
            gamma = torch.where(branch.computed_steps >= 2, value, 1.0)
        return error.float(), gamma


def _abs_sum(value: torch.Tensor) -> torch.Tensor:
    return value.float().abs().flatten(1).sum(1)  # (B,) float32 over this rank's shard
