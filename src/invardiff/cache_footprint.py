"""Peak cache memory of a plan computed from its decisions, without running the engine.

The plan policy keeps a unit's output after executed step ``p`` exactly when the next executed step ``t`` reuses it
(``policies/plan.py``), and frees it when step ``t``'s reuse is the last of its run. So every reused entry
``(unit u, executed step t)`` holds ``size_u`` bytes over one interval of the run: from the moment ``u`` ran at the
executed step before ``t`` to the moment ``u`` is reached at ``t``. The held bytes at any moment are the sum over the
entries whose interval covers it, plus the pre-head state H the step cache keeps; the peak is their maximum over
the events (a unit storing, H replaced at the head). Entries are independent: dropping one reuse (computing
instead) removes exactly its interval and nothing else, which is what makes fitting a plan to a bound a clean
0/1 problem (``memory_fit.py``).

:func:`measure_footprint` reads what the intervals need from one forward of the model config on the meta device
(each unit's stored output, in execution order, and H); :func:`peak_cache_bytes` replays the engine's accounting on
it, and equals the engine's own ``summary(...).peak_cache_bytes`` on the meta device (tested), in a millisecond
instead of seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .engine.storage import stored_bytes
from .families import get_family
from .families.spec import pre_head_capture
from .model_configs import ModelConfig
from .plan import CachePlan, PlanError
from .policies.extrapolation import StepExtrapolation
from .stats import unit_reuse


@dataclass(frozen=True)
class CacheFootprint:
    """What each cached value of one run on a model config occupies, and the order in which units run.

    Attributes:
        config_name: the model config (call shape and dtype) this was measured on.
        units: ``(block_list, layer, unit)`` of every reusable unit, in engine order.
        tensors: per unit, ``(elements, dtype)`` of each tensor of its stored output (Flux joint attention: two).
        order: unit indices in execution order (a Flux single block runs ``mlp`` before ``attn``).
        hidden: ``(elements, dtype)`` of the pre-head hidden state H.
    """

    config_name: str
    units: tuple[tuple[str, int, str], ...]
    tensors: tuple[tuple[tuple[int, torch.dtype], ...], ...]
    order: tuple[int, ...]
    hidden: tuple[int, torch.dtype]

    def unit_bytes(self, cache_dtype: str | None = None) -> np.ndarray:
        """``(U,)`` bytes of each unit's cached output (engine order), stored as ``cache_dtype`` (None: as is)."""
        return np.array([sum(stored_bytes(n, d, cache_dtype) for n, d in tensors) for tensors in self.tensors])

    def hidden_bytes(self, cache_dtype: str | None = None) -> int:
        return stored_bytes(*self.hidden, cache_dtype)

    def check_plan(self, plan: CachePlan) -> None:
        layers = {}
        for block_list, layer, _ in self.units:
            layers[block_list] = max(layers.get(block_list, 0), layer + 1)
        try:
            plan.check_model(plan.model.family, layers)
        except PlanError as error:
            raise PlanError(f"{error} (memory footprint of {self.config_name})") from None


def measure_footprint(config: ModelConfig) -> CacheFootprint:
    """The :class:`CacheFootprint` of one transformer call on ``config``, measured on the meta device (no memory, no
    compute: seconds for FLUX.1-dev at 1024x1024)."""
    family = get_family(config.family)
    model = config.build_transformer("meta")
    units, fired, handles = [], [], []
    for index, (spec, layer, unit, block) in enumerate(family.units_of(model)):
        units.append((spec.attr, layer, unit.name))
        # The engine stores what the unit's last stage returns (the pass-through's output when there is one).
        module = block.get_submodule(unit.submodules[-1])
        handles.append(module.register_forward_hook(_record(fired, index)))
    head_handles, pre_head = pre_head_capture(family, model)  # H: the head's input, or the packed head streams
    handles += head_handles
    try:
        with torch.no_grad():
            model(**config.example_call("meta"))
    finally:
        for handle in handles:
            handle.remove()
    tensors = dict(fired)
    order = tuple(dict.fromkeys(index for index, _ in fired))  # a unit's first firing places it
    if len(order) != len(units):
        raise RuntimeError(f"{len(units) - len(order)} units of {config.name} did not run in a forward.")
    value = pre_head()
    return CacheFootprint(
        config.name,
        tuple(units),
        tuple(tensors[i] for i in range(len(units))),
        order,
        (value.numel(), value.dtype),
    )


def _record(fired: list, index: int):
    def hook(module, args, output):
        items = [output] if torch.is_tensor(output) else [t for t in output if torch.is_tensor(t)]
        fired.append((index, tuple((t.numel(), t.dtype) for t in items)))

    return hook


@dataclass(frozen=True)
class ReuseLayout:
    """A plan's decisions as the memory model sees them.

    ``reuse``: ``(T, U)`` effective unit reuse at executed steps (engine unit order); ``executed``: ``(T,)``;
    ``hidden_after``: ``(T,)`` bytes of H (or of the two or three H an extrapolation needs) kept after each step."""

    reuse: np.ndarray
    executed: np.ndarray
    hidden_after: np.ndarray


def reuse_layout(plan: CachePlan, footprint: CacheFootprint, cache_dtype: str | None = None) -> ReuseLayout:
    """The :class:`ReuseLayout` of ``plan`` on ``footprint``; H's bytes as stored in ``cache_dtype``."""
    footprint.check_plan(plan)
    executed = ~plan.step_cache
    effective = {facts.name: unit_reuse(plan, facts.name) for facts in plan.model.block_lists}
    reuse = np.zeros((plan.num_inference_steps, len(footprint.units)), dtype=bool)
    for index, (block_list, layer, name) in enumerate(footprint.units):
        reuse[:, index] = effective[block_list][name][:, layer] & executed
    steps = StepExtrapolation(plan)
    size = footprint.hidden_bytes(cache_dtype)
    hidden_after = np.zeros(plan.num_inference_steps, dtype=np.int64)
    for t in range(plan.num_inference_steps):
        if steps.keep_after[t]:
            # A computed step keeps H (two or three of them to extrapolate from); a step-cached step carries it on.
            hidden_after[t] = hidden_after[t - 1] if plan.step_cache[t] else size * max(1, steps.history_after[t])
    return ReuseLayout(reuse, executed, hidden_after)


def keep_after(reuse: np.ndarray, executed: np.ndarray) -> np.ndarray:
    """``(T, U)``: the output is kept after executed step t iff the next executed step reuses it (the plan policy's
    rule: otherwise that step recomputes, or the run ends, and the memory goes at once)."""
    keep = np.zeros_like(reuse)
    steps = np.flatnonzero(executed)
    keep[steps[:-1]] = reuse[steps[1:]]
    return keep


def replay_peak(layout: ReuseLayout, order, sizes: np.ndarray) -> int:
    """The engine's peak of held bytes over a run, replaying its store and free events in execution order."""
    reuse, executed = layout.reuse, layout.executed
    keep = keep_after(reuse, executed)
    held = peak = hidden = 0
    sizes = [int(s) for s in sizes]
    for t in range(len(executed)):
        if executed[t]:
            for u in order:
                if reuse[t, u]:
                    if not keep[t, u]:
                        held -= sizes[u]  # the last reuse of a run frees the output as it is read
                elif keep[t, u]:
                    held += sizes[u]
                    peak = max(peak, held)
        held += int(layout.hidden_after[t]) - hidden  # the head replaces the kept H
        hidden = int(layout.hidden_after[t])
        peak = max(peak, held)
    return peak


def peak_cache_bytes(plan: CachePlan, footprint: CacheFootprint, cache_dtype: str | None = None) -> int:
    """Peak bytes the engine holds for ``plan`` in one branch of a run on the footprint's config (what
    ``invardiff.memory.cache_memory`` measures), with cached values stored as ``cache_dtype`` (default: the plan's
    own ``cache_dtype``, else the model's dtype). Refuses plans that extrapolate reused units (their pairs are kept
    on other steps; measure those with ``invardiff.memory.cache_memory``)."""
    if plan.unit_extrapolation is not None and any(
        (matrix != 0).any() for units in plan.unit_extrapolation.values() for matrix in units.values()
    ):
        raise NotImplementedError(
            "The memory model does not cover plans that extrapolate reused units (format version 2 with "
            "unit_extrapolation); measure them with invardiff.memory.cache_memory (meta device)."
        )
    dtype = cache_dtype if cache_dtype is not None else plan.cache_dtype
    layout = reuse_layout(plan, footprint, dtype)
    return replay_peak(layout, footprint.order, footprint.unit_bytes(dtype))
