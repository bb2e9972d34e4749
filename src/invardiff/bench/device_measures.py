"""What only a CUDA device can measure about a benchmark variant's runs, for ``benchmarks/gpu_check.py``.

:class:`MeasuredVariant` wraps a :class:`~invardiff.bench.timing.Variant` of the engine benchmark (alternating
schedule: one run at a time on one transformer) and records, for each of its runs:

* ``peak_bytes``: ``torch.cuda.max_memory_allocated`` over the run, its peak statistics reset at the start; the
  peak cache memory of a plan is its run's peak less full compute's (the same weights, inputs and activations);
* ``held_bytes``: the most memory allocated at the end of a step beyond what was allocated when the run started,
  i.e. what the cache holds between steps;
* host syncs: ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronizing CUDA call (``.item()``,
  ``nonzero``, a blocking copy to the host...) warn; the warnings of the run are counted per call site. The timing
  loop's own ``torch.cuda.synchronize`` around each transformer call is in every variant's count alike, full
  compute's included, so what a cache adds is its count less full compute's.

Nothing is measured off CUDA (the fields say why); the timings themselves are the timing loop's.
"""

from __future__ import annotations

import collections
import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .timing import Variant


SYNC_WARNING = "synchroniz"  # c10's warning: "called a synchronizing CUDA operation"


@dataclass
class RunMeasures:
    """One run's device measurements (bytes, and host syncs per call site ``path:line``)."""

    peak_bytes: int = 0
    start_bytes: int = 0
    held_bytes: int = 0
    syncs: collections.Counter = field(default_factory=collections.Counter)

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())


class SyncWarnings:
    """``with SyncWarnings() as caught:`` counts the synchronizing CUDA calls in the block (``caught.sites``); other
    warnings raised meanwhile are re-issued when the block ends."""

    def __enter__(self) -> SyncWarnings:
        self.sites: collections.Counter = collections.Counter()
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")  # every sync warns, not only the first one per call site
        self._previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode(self._previous)
        self._catcher.__exit__(*exc)
        for record in self._records:
            if SYNC_WARNING in str(record.message):
                self.sites[f"{record.filename}:{record.lineno}"] += 1
            else:
                warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)


class MeasuredVariant:
    """A timed variant whose every run on the CUDA ``device`` is measured; ``last`` holds the latest run's
    :class:`RunMeasures`. The measuring happens in ``start`` and ``finish``, outside the timed regions, except the
    reading of ``torch.cuda.memory_allocated`` after each step (a host-side counter: no sync)."""

    def __init__(self, variant: Variant, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"MeasuredVariant measures CUDA runs; got device {device}.")
        self.inner = variant
        self.device = device
        self.last: RunMeasures | None = None
        self._current: RunMeasures | None = None
        self._syncs: SyncWarnings | None = None
        self.variant = Variant(variant.name, self._step, self._start, self._finish)

    def _start(self) -> None:
        self.inner.start()
        gc.collect()  # a former variant's cache, if a reference cycle still holds it, must not count for this run
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        self._current = RunMeasures(start_bytes=start)
        self._syncs = SyncWarnings().__enter__()

    def _step(self, index: int) -> float:
        seconds = self.inner.step(index)
        held = torch.cuda.memory_allocated(self.device) - self._current.start_bytes
        self._current.held_bytes = max(self._current.held_bytes, held)
        return seconds

    def _finish(self) -> None:
        try:
            if self._syncs is not None:
                self._syncs.__exit__(None, None, None)
                torch.cuda.synchronize(self.device)
                self._current.peak_bytes = torch.cuda.max_memory_allocated(self.device)
                self._current.syncs = self._syncs.sites
                self.last = self._current
        finally:
            self._syncs = None
            self.inner.finish()


def profile_summary(variant: Variant, steps: int, device: torch.device, row_limit: int = 15) -> str:
    """One run of ``variant`` under ``torch.profiler`` (CPU, and CUDA kernels on CUDA): the table of its most
    expensive operators, by self device time on CUDA and self CPU time elsewhere."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    variant.start()
    try:
        with profile(activities=activities) as profiler:
            for index in range(steps):
                variant.step(index)
    finally:
        variant.finish()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=row_limit)


def measured_fields(
    measures: dict[str, RunMeasures], name: str, steps: int, estimate_bytes: int | None
) -> dict[str, float | int | dict]:
    """The device fields of variant ``name``'s row: its peak cache memory (its run's peak less full compute's, and
    what it held between steps) against the meta-device ``estimate_bytes``, and host syncs per step (all, and
    those beyond full compute's)."""
    run, stock = measures[name], measures["stock"]
    peak_delta = run.peak_bytes - stock.peak_bytes
    fields = {
        "measured_peak_cache_bytes": peak_delta,
        "measured_held_cache_bytes": run.held_bytes,
        "host_syncs_per_step": run.sync_count / steps,
        "stock_host_syncs_per_step": stock.sync_count / steps,
        "added_host_syncs_per_step": (run.sync_count - stock.sync_count) / steps,
        "host_sync_sites": dict(run.syncs.most_common(8)),
    }
    if estimate_bytes is not None:
        fields["memory_vs_estimate"] = peak_delta / estimate_bytes - 1.0 if estimate_bytes else None
    return fields


def instrumenter(device: torch.device, measured: dict[str, MeasuredVariant]) -> Callable[[Variant], Variant]:
    """``bench_family``'s ``instrument`` hook: each variant measured on ``device``, kept in ``measured`` by name."""

    def instrument(variant: Variant) -> Variant:
        measured[variant.name] = MeasuredVariant(variant, device)
        return measured[variant.name].variant

    return instrument
