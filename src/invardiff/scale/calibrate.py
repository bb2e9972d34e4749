"""Sharded InvarDiff calibration: both passes' runs recorded on several Ray workers, one plan.

:func:`invardiff.calibration.calibrate` cuts its (input, seed) runs into batches and records each pass batch by
batch; a run's change rates depend only on its own batch. So the workers here record whole batches (the same
batches a single process would run, one pipeline call each) and the driver concatenates their per-run rates in
batch order: the arrays, and therefore the plan, are byte-identical to a single-process calibration with the same
runs and batch size. Pass 2 needs the provisional plan of pass 1: the driver builds it once and ships the same
object to every worker (one ``ray.put``), so every worker re-measures under the same provisional plan.

The driver also holds the pipeline (to read its family, size the batches and write the provenance) but runs no
sampling; load it on the CPU. Throughput: two passes of ``N`` runs on ``W`` workers take about ``2 N t / W``.
"""

from __future__ import annotations

import numpy as np

from ..calibration.run import PassSetup, calibrate, record_batches
from .actors import ONE_WORKER, ActorPool, Workers, import_ray
from .runner import PipelineSource


class _CalibrationWorker:
    def __init__(self, source: PipelineSource, threads: int | None):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.pipe = source.load()

    def record(self, task: tuple[int, list], provisional, setup: PassSetup) -> dict:
        index, batch = task
        return record_batches(self.pipe, setup, [batch], provisional)

    def ready(self) -> bool:
        return True


class CalibrationPool(ActorPool):
    """Ray actors that each load ``source`` once and record calibration batches; pass :meth:`record` as the
    ``runner`` of :func:`invardiff.calibration.calibrate`."""

    def __init__(self, source: PipelineSource, workers: Workers = ONE_WORKER, on_start=None):
        super().__init__(_CalibrationWorker, (source, workers.threads(source.device)), workers, on_start)
        self.progress = None

    def record(self, name: str, setup: PassSetup, batches: list[list[tuple]], provisional) -> dict:
        shared = (import_ray().put(provisional), setup)  # the same provisional plan for every worker
        by_index = {}
        for (index, _), rates in self.results(list(enumerate(batches)), "record", *shared):
            by_index[index] = rates
            if self.progress is not None:
                self.progress(name, len(by_index), len(batches))
        ordered = [by_index[index] for index in range(len(batches))]  # the single-process run order
        return {part: _concatenate([rates[part] for rates in ordered]) for part in ordered[0]}


def _concatenate(batches: list[tuple]) -> tuple:
    """One part's (step, modules) rates of several batches, runs in batch order."""
    step = np.concatenate([step for step, _ in batches])
    return step, {kind: np.concatenate([modules[kind] for _, modules in batches]) for kind in batches[0][1]}


def calibrate_on_ray(
    pipe, source: PipelineSource, workers: Workers = ONE_WORKER, progress=None, on_start=None, **calibrate_kwargs
):
    """:func:`invardiff.calibration.calibrate` on ``pipe`` (the driver's copy, for the family, batch size and
    provenance) with the runs of both passes recorded by Ray actors loading ``source``. Same arguments and result
    as ``calibrate``; the plan is byte-identical to a single-process calibration with the same runs and batches.
    ``on_start(ready, count)`` reports the actors' start (:class:`~invardiff.scale.actors.ActorPool`)."""
    with CalibrationPool(source, workers, on_start) as pool:
        pool.progress = progress
        return calibrate(pipe, runner=pool.record, **calibrate_kwargs)
