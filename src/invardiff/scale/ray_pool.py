"""Data-parallel generation on a Ray actor pool (``pip install invardiff[ray]``).

Each actor loads the pipeline once (:class:`~invardiff.scale.runner.ItemRunner`) and enables a run's policy once
for all the batches of work items it receives in that run; every item is one pipeline call with its own seed, so
an item's image is the same bit for bit on any worker and in the single-process loop. The driver is the only
writer: it records each result in the output directory's manifest as it arrives
(:class:`~invardiff.scale.items.Manifest`), so that

* a rerun skips the items already recorded;
* an actor that dies (node lost, out of memory, ``ray.kill``) loses only its unfinished batches: they go back to
  the front of the queue and run on another actor (a replacement is started while ``max_replacements`` allows),
  and an item is recorded once even if it were to arrive twice.

Throughput model: with ``W`` workers each taking ``t`` seconds per item, the pool makes about ``W / t`` items per
second once the actors are warm, minus a per-batch round trip (milliseconds, amortised over ``batch_items``); two
batches are kept in flight per actor so that it never waits for the driver.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .actors import ONE_WORKER, ActorPool, Workers, import_ray
from .items import Manifest, WorkItem
from .runner import ItemRunner, PipelineSource, RunReport, output_settings


class _Worker:
    """The actor: an :class:`ItemRunner`, the id of the policy it has enabled, and where it runs."""

    def __init__(self, source: PipelineSource, steps: int | None, threads: int | None):
        self.runner = ItemRunner(source, steps, threads)
        self.policy_id = None
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, items: list[WorkItem], policy, policy_id: int) -> list[tuple]:
        if policy_id != self.policy_id:  # a new run: enable its policy once for all its batches
            self.runner.use(policy)
            self.policy_id = policy_id
        return [(image, {**info, "worker": self.where}) for image, info in map(self.runner.run, items)]

    def ready(self) -> str:
        return self.where


class GenerationPool(ActorPool):
    """A pool of Ray actors generating with ``source``; each :meth:`run` has its own policy.

    Args:
        source: where each actor loads the pipeline from.
        workers: how many actors, their resources and the cluster (:class:`~invardiff.scale.actors.Workers`).
        steps: sampling steps (default: the plan's, else the bundled model's).
        batch_items: items per actor call; larger amortises the round trip, smaller loses less when an actor dies.
        on_start: ``on_start(ready, count)`` while the actors start (:class:`~invardiff.scale.actors.ActorPool`).

    Example:
        ```python
        >>> items = work_items(["a red circle", "a blue square"], seeds=[0, 1])
        >>> with GenerationPool(PipelineSource("bundled", "flux-shapes"), Workers(2)) as pool:
        ...     report = pool.run(items, "out/", plan)
        ```
    """

    def __init__(
        self,
        source: PipelineSource,
        workers: Workers = ONE_WORKER,
        steps: int | None = None,
        batch_items: int = 1,
        on_start: Callable[[int, int], None] | None = None,
    ):
        if batch_items < 1:
            raise ValueError(f"batch_items must be >= 1, got {batch_items}.")
        self.batch_items = batch_items
        self.source, self.steps = source, steps
        self._runs = 0
        super().__init__(_Worker, (source, steps, workers.threads(source.device)), workers, on_start)

    def run(
        self,
        items: list[WorkItem],
        output: str | Path,
        policy=None,
        progress: Callable[[WorkItem], None] | None = None,
        overwrite: bool = False,
    ) -> RunReport:
        """Generate the items of ``items`` not yet in ``output``'s manifest with ``policy`` (a config for
        :func:`invardiff.enable`, ``None``: full compute); returns when all are recorded. ``output`` holding items
        of other settings raises :class:`~invardiff.scale.items.SettingsMismatch` unless ``overwrite``."""
        ray = import_ray()
        manifest = Manifest(output, output_settings(self.source, policy, self.steps), overwrite)
        self._runs += 1
        shared = (ray.put(policy), self._runs)  # shipped once; each actor enables it at its first batch of the run
        pending = manifest.pending(items)
        batches = [pending[i : i + self.batch_items] for i in range(0, len(pending), self.batch_items)]
        start = time.perf_counter()
        for batch, results in self.results(batches, "run", *shared):
            for item, (image, info) in zip(batch, results, strict=True):
                manifest.record(item, image, info)
                if progress is not None:
                    progress(item)
        seconds = time.perf_counter() - start
        return RunReport(len(pending), len(items) - len(pending), seconds, self.workers, str(manifest.directory))


def generate_on_ray(
    source: PipelineSource,
    items: list[WorkItem],
    output: str | Path,
    policy=None,
    workers: Workers = ONE_WORKER,
    steps: int | None = None,
    progress: Callable[[WorkItem], None] | None = None,
    overwrite: bool = False,
    on_start: Callable[[int, int], None] | None = None,
) -> RunReport:
    """Start a :class:`GenerationPool`, generate ``items`` into ``output``, shut the pool down. ``output``'s
    manifest is checked before the pool starts (:class:`~invardiff.scale.items.SettingsMismatch`);
    ``on_start(ready, count)`` reports the actors' start (see :class:`~invardiff.scale.actors.ActorPool`)."""
    if not overwrite:
        Manifest(output, output_settings(source, policy, steps))  # refuses a mismatched resume before any work
    with GenerationPool(source, workers, steps, on_start=on_start) as pool:
        return pool.run(items, output, policy, progress, overwrite)
