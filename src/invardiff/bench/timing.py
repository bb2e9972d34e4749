"""The one timing loop of every benchmark: variants measured in rounds, in one process, against each other.

Every benchmark that compares a baseline with cached variants (the sweep, ``bench-engine`` and its peers, the
demo) times them here, the same way:

* warm-up rounds first (not recorded), then ``rounds`` timed rounds;
* ``schedule="alternate"``: in each round every variant makes one whole run, one after the other, in an order
  rotated every round (with two variants: the order flips every round), so slow drifts of a shared or throttled
  machine hit every variant alike. ``start`` and ``finish`` run untimed around each run (attach and detach a cache);
* ``schedule="lockstep"``: every variant has its own copy of the model and takes step ``i`` right after the others
  (order rotated every step); ``start`` and ``finish`` run once per round around all the steps. The host heap is
  pinned first (:func:`~invardiff.bench.host_heap.pin_host_heap`): otherwise one variant's allocations decide
  how many page faults the next one's take;
* a variant's time in a round is the sum of what its ``step`` returns; timed regions are wrapped by :func:`timed`,
  which synchronizes the device before and after (CUDA launches are asynchronous);
* the figures are medians over rounds of per-round ratios (:meth:`RoundTimes.median_ratio`), which cancels what
  a round's conditions do to all variants alike;
* every speedup is reported with how sure it is (:func:`speedup_figures`): the per-round ratios, their spread, and
  warnings when the rounds disagree or the measured speedup exceeds the FLOP-ideal one by more than the spread
  allows (another job took the CPU or GPU during some runs), logged and returned for the report.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .host_heap import pin_host_heap


logger = logging.getLogger(__name__)

SCHEDULES = ("alternate", "lockstep")
# Rounds "disagree" when their speedups span more than this fraction of the median: the lockstep and alternating
# schedules keep the round-to-round spread of a quiet machine near 10-20% on this project's shared CPUs, and a
# job that starts between rounds moves one round's ratio by far more.
DISAGREEMENT = 0.25
# A measured speedup may exceed the FLOP-ideal one by this fraction (or by half the rounds' range, if larger)
# before it is called implausible: FLOPs count matmuls only, so an efficiency a little above 1 is noise, and far
# above 1 means the baseline ran on a busier machine than the cached runs.
ABOVE_IDEAL = 0.10
RERUN_ADVICE = "rerun on an idle machine (or with more --rounds) before trusting this figure"


def timed(fn: Callable[[], object], device: torch.device | str) -> tuple[float, object]:
    """Run ``fn`` once and return (seconds, result), synchronizing the device before and after."""
    device = torch.device(device)
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def _nothing() -> None:
    return None


@dataclass
class Variant:
    """One way to run what is being timed.

    ``step(index)`` runs step ``index`` (or, with one step per run, the whole run) and returns the seconds it timed
    (with :func:`timed`, or :func:`whole_run`). ``start`` runs untimed before a run and ``finish`` after it, also
    when the run raised (``finish`` does not run when ``start`` raised).
    """

    name: str
    step: Callable[[int], float]
    start: Callable[[], None] = field(default=_nothing)
    finish: Callable[[], None] = field(default=_nothing)


def whole_run(fn: Callable[[], object], device: torch.device | str) -> Callable[[int], float]:
    """A :class:`Variant` ``step`` that times one call of ``fn``, synchronized on ``device``."""
    return lambda index: timed(fn, device)[0]


@dataclass
class RoundTimes:
    """Seconds per timed round (warm-up excluded), by variant name."""

    seconds: dict[str, list[float]]

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        return [n / d for n, d in zip(self.seconds[numerator], self.seconds[denominator], strict=True)]

    def median_ratio(self, numerator: str, denominator: str) -> float:
        """Median of the per-round ratios: speedup = ``median_ratio(baseline, variant)``."""
        return median(self.ratios(numerator, denominator))

    def median_seconds(self, name: str) -> float:
        return median(self.seconds[name])

    def speedup(self, baseline: str, variant: str, ideal: float | None = None, label: str = "") -> dict:
        """:func:`speedup_figures` of ``variant`` against ``baseline``."""
        return speedup_figures(self.ratios(baseline, variant), ideal, label or variant)


def speedup_figures(ratios: list[float], ideal: float | None = None, label: str = "speedup") -> dict:
    """A measured speedup with how sure it is, from its per-round ratios.

    Returns ``measured_speedup`` (median ratio), ``round_speedups``, ``spread`` ((max - min) / median of the
    ratios) and ``timing_warnings``: a sentence each when the rounds disagree (spread > :data:`DISAGREEMENT`), or
    when the median exceeds ``ideal`` by more than ``max(ABOVE_IDEAL * ideal, (max - min) / 2)``. Warnings are
    also logged.
    """
    measured = median(ratios)
    spread = (max(ratios) - min(ratios)) / measured
    shown = ", ".join(f"{r:.2f}x" for r in ratios)
    warnings = []
    if len(ratios) > 1 and spread > DISAGREEMENT:
        warnings.append(
            f"{label}: the rounds disagree (speedups {shown}, spread {spread:.0%} of the median, more than "
            f"{DISAGREEMENT:.0%}): the machine's load changed during the measurement; {RERUN_ADVICE}."
        )
    if ideal is not None and measured > ideal + max(ABOVE_IDEAL * ideal, (max(ratios) - min(ratios)) / 2):
        warnings.append(
            f"{label}: measured {measured:.2f}x exceeds the FLOP-ideal {ideal:.2f}x by more than the rounds' spread "
            f"allows (rounds: {shown}): full compute ran on a busier machine than the cached runs, or the model is "
            f"so small that per-call overhead, which FLOPs do not count, dominates; {RERUN_ADVICE}."
        )
    for warning in warnings:
        logger.warning(warning)
    return {
        "measured_speedup": measured,
        "round_speedups": list(ratios),
        "spread": spread,
        "timing_warnings": warnings,
    }


def measure_rounds(
    variants: list[Variant],
    rounds: int,
    *,
    warmup_rounds: int = 1,
    steps: int = 1,
    schedule: str = "alternate",
    on_round: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RoundTimes:
    """Time ``variants`` over ``warmup_rounds + rounds`` rounds (see the module docstring); ``steps`` is how many
    ``step`` calls make one run. ``on_start(index)`` is called before and ``on_round(index)`` after every round
    (index < ``warmup_rounds``: a warm-up round)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}.")
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"Variant names must be unique, got {names}.")
    if schedule == "lockstep":
        pin_host_heap()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup_rounds + rounds):
        if on_start is not None:
            on_start(round_index)
        if schedule == "alternate":
            elapsed = _alternate_round(variants, round_index, steps)
        else:
            elapsed = _lockstep_round(variants, round_index, steps)
        if round_index >= warmup_rounds:
            for name in names:
                seconds[name].append(elapsed[name])
        if on_round is not None:
            on_round(round_index)
    return RoundTimes(seconds)


def round_progress(progress: Callable[[str | None], None] | None, name: str, rounds: int) -> dict:
    """``measure_rounds`` callbacks for a progress display: ``progress(message)`` names the round that starts (the
    phase in progress, not the one that finished), ``progress(None)`` says that it finished."""

    def on_start(index: int) -> None:
        message = f"{name}: round {index}/{rounds}" + (" (warm-up)" if index == 0 else "")
        logger.info(message)
        if progress is not None:
            progress(message)

    def on_round(index: int) -> None:
        if progress is not None:
            progress(None)

    return {"on_start": on_start, "on_round": on_round}


def _alternate_round(variants: list[Variant], round_index: int, steps: int) -> dict[str, float]:
    elapsed = {}
    for variant in _rotated(variants, round_index):
        variant.start()
        try:
            elapsed[variant.name] = sum(variant.step(index) for index in range(steps))
        finally:
            variant.finish()
    return elapsed


def _lockstep_round(variants: list[Variant], round_index: int, steps: int) -> dict[str, float]:
    elapsed = dict.fromkeys((variant.name for variant in variants), 0.0)
    started = []
    try:
        for variant in variants:
            variant.start()
            started.append(variant)
        for index in range(steps):
            for variant in _rotated(variants, round_index * steps + index):
                elapsed[variant.name] += variant.step(index)
    finally:
        for variant in started:
            variant.finish()
    return elapsed


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
