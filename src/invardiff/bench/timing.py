"""The one timing loop of every benchmark: variants measured in rounds, in one process, against each other.

Every benchmark that compares a baseline with cached variants (the sweep, ``bench-engine`` and its peers, the
demo) times them here, the same way:

* warm-up rounds first (not recorded), then ``rounds`` timed rounds;
* ``schedule="alternate"``: in each round every variant makes one whole run, one after the other, in an order
  rotated every round (with two variants: the order flips every round), so slow drifts of a shared or throttled
  machine hit every variant alike. ``start`` and ``finish`` run untimed around each run (attach and detach a cache);
* ``schedule="lockstep"``: every variant has its own copy of the model and takes step ``i`` right after the others
  (order rotated every step); ``start`` and ``finish`` run once per round around all the steps;
* a variant's time in a round is the sum of what its ``step`` returns; timed regions are wrapped by :func:`timed`,
  which synchronizes the device before and after (CUDA launches are asynchronous);
* the figures are medians over rounds of per-round ratios (:meth:`RoundTimes.median_ratio`), which cancels what
  a round's conditions do to all variants alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


SCHEDULES = ("alternate", "lockstep")


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


def measure_rounds(
    variants: list[Variant],
    rounds: int,
    *,
    warmup_rounds: int = 1,
    steps: int = 1,
    schedule: str = "alternate",
    on_round: Callable[[int], None] | None = None,
) -> RoundTimes:
    """Time ``variants`` over ``warmup_rounds + rounds`` rounds (see the module docstring); ``steps`` is how many
    ``step`` calls make one run. ``on_round(index)`` is called after every round (index < ``warmup_rounds``: a
    warm-up round)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}.")
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"Variant names must be unique, got {names}.")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup_rounds + rounds):
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
