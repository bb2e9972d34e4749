"""The speed-quality sweep with its operating points spread over Ray workers.

Each worker loads the pipeline once, runs full compute once (the reference images, FLOPs and warm-up, as
:func:`invardiff.bench.sweep.run_sweep` does), then measures the points it is given with
:func:`~invardiff.bench.sweep.run_point`: a point's timed rounds alternate with full compute inside that one worker,
so its speedup is a ratio of times taken on the same process, device and load. Points on different workers run at
the same time: on a machine whose workers share cores or memory bandwidth the absolute seconds are slower than a
one-process sweep, while the alternating ratios stay comparable. Quality metrics do not depend on the worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..bench.sweep import OperatingPoint, SweepInputs, count_flops, run_point
from .actors import ONE_WORKER, ActorPool, Workers
from .runner import PipelineSource


TIMING_NOTE = (
    "Points were spread over {workers} Ray worker(s); each point's rounds alternate with full compute inside one "
    "worker, and points on different workers ran concurrently (absolute seconds include their contention)."
)


class _SweepWorker:
    def __init__(self, inputs: SweepInputs, threads: int | None):
        import os
        import socket

        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.inputs = inputs
        self.pipe = inputs.load_pipeline()
        flops, images = count_flops(lambda: inputs.generate(self.pipe))  # also full compute's warm-up
        self.full = {"images": images, "flops": flops}
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def measure(self, task: tuple[int, OperatingPoint], rounds: int) -> dict:
        _, point = task
        return {**run_point(self.inputs, self.pipe, self.full, point, rounds), "worker": self.where}

    def ready(self) -> str:
        return self.where


def run_sweep_on_ray(
    inputs: SweepInputs,
    points: list[OperatingPoint],
    rounds: int = 3,
    on_result: Callable[[dict], None] | None = None,
    done: dict[str, dict] | None = None,
    *,
    source: PipelineSource,
    workers: Workers = ONE_WORKER,
    on_start: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """:func:`invardiff.bench.sweep.run_sweep` with the points measured on Ray actors (``workers``); results in the
    points' order (``on_result`` sees them as they arrive). Each worker loads its pipeline from ``source`` (the
    driver's ``inputs.load_pipeline`` may hold the driver's copy); ``inputs.generate`` and the points are shipped
    with cloudpickle; ``on_start(ready, count)`` reports the actors' start."""
    todo = [(index, point) for index, point in enumerate(points) if not (done and point.label in done)]
    measured = {}
    shipped = dataclasses.replace(inputs, load_pipeline=source.load)
    with ActorPool(_SweepWorker, (shipped, workers.threads(source.device)), workers, on_start) as pool:
        for (index, _), result in pool.results(todo, "measure", rounds):
            measured[index] = result
            if on_result is not None:
                on_result(result)
    return [measured[index] if index in measured else done[point.label] for index, point in enumerate(points)]
