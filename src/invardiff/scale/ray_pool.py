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

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .items import Manifest, WorkItem
from .runner import ItemRunner, PipelineSource, RunReport


logger = logging.getLogger(__name__)

IN_FLIGHT = 2  # batches per actor: one running, one queued in the actor, so it never idles on the driver


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "invardiff's Ray pool needs Ray: pip install 'invardiff[ray]' (or pip install 'ray>=2.30')."
        ) from error
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the Ray cluster at ``address`` (``"auto"``: the one started with ``ray start``), or start a
    local one when ``address`` is ``None``; a Ray already initialised in this process is used as it is."""
    ray = import_ray()
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
        else:
            ray.init(address=address)
    return ray


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


class GenerationPool:
    """A pool of ``workers`` Ray actors generating with ``source``; each :meth:`run` has its own policy.

    Args:
        source: where each actor loads the pipeline from.
        workers: actors; each takes ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs of the cluster.
        steps: sampling steps (default: the plan's, else the bundled model's).
        batch_items: items per actor call; larger amortises the round trip, smaller loses less when an actor dies.
        max_replacements: actors started to replace dead ones (default: ``workers``); then the run fails.
        address: Ray cluster address (see :func:`init_ray`).

    Example:
        ```python
        >>> items = work_items(["a red circle", "a blue square"], seeds=[0, 1])
        >>> with GenerationPool(PipelineSource("bundled", "flux-shapes"), plan, workers=2) as pool:
        ...     report = pool.run(items, "out/", plan)
        ```
    """

    def __init__(
        self,
        source: PipelineSource,
        *,
        workers: int = 1,
        steps: int | None = None,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        batch_items: int = 1,
        max_replacements: int | None = None,
        address: str | None = None,
    ):
        if workers < 1 or batch_items < 1:
            raise ValueError(f"workers and batch_items must be >= 1, got {workers} and {batch_items}.")
        self.source, self.steps = source, steps
        self.workers, self.batch_items = workers, batch_items
        self.replacements_left = workers if max_replacements is None else max_replacements
        ray = init_ray(address, None if address else max(workers, int(workers * cpus_per_worker)))
        threads = max(1, int(cpus_per_worker)) if source.device == "cpu" else None
        self._actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        self._actor_args = (source, steps, threads)
        self._runs = 0
        self.actors = [self._new_actor() for _ in range(workers)]
        ray.get([actor.ready.remote() for actor in self.actors])  # load every pipeline before the clock starts

    def _new_actor(self):
        return self._actor_class.remote(*self._actor_args)

    def __enter__(self) -> GenerationPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def run(
        self,
        items: list[WorkItem],
        output: str | Path,
        policy=None,
        progress: Callable[[WorkItem], None] | None = None,
    ) -> RunReport:
        """Generate the items of ``items`` not yet in ``output``'s manifest with ``policy`` (a config for
        :func:`invardiff.enable`, ``None``: full compute); returns when all are recorded."""
        ray = import_ray()
        self._runs += 1
        self._policy = (ray.put(policy), self._runs)  # shipped once; each actor enables it at its first batch
        manifest = Manifest(output)
        pending = manifest.pending(items)
        queue = deque(pending[i : i + self.batch_items] for i in range(0, len(pending), self.batch_items))
        in_flight: dict = {}  # object ref -> (actor, batch)
        start = time.perf_counter()
        for actor in self.actors:
            self._feed(actor, queue, in_flight)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, batch = in_flight.pop(ref)
            try:
                results = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                queue.appendleft(batch)  # nothing of this batch was recorded: it runs again elsewhere
                self._retire(actor, error)
                for other in self.actors:
                    self._feed(other, queue, in_flight)
                continue
            for item, (image, info) in zip(batch, results, strict=True):
                manifest.record(item, image, info)
                if progress is not None:
                    progress(item)
            self._feed(actor, queue, in_flight)
        seconds = time.perf_counter() - start
        return RunReport(len(pending), len(items) - len(pending), seconds, self.workers, str(manifest.directory))

    def _feed(self, actor, queue: deque, in_flight: dict) -> None:
        if actor not in self.actors:
            return
        while queue and sum(a is actor for a, _ in in_flight.values()) < IN_FLIGHT:
            batch = queue.popleft()
            in_flight[actor.run.remote(batch, *self._policy)] = (actor, batch)

    def _retire(self, actor, error) -> None:
        """Drop a dead actor and start a replacement while ``max_replacements`` allows."""
        if actor not in self.actors:
            return  # a second batch of an actor already retired
        self.actors.remove(actor)
        if self.replacements_left > 0:
            self.replacements_left -= 1
            logger.warning("a Ray worker died (%s); starting a replacement", type(error).__name__)
            self.actors.append(self._new_actor())
        elif not self.actors:
            raise RuntimeError(
                "Every Ray worker died and no replacement is left (max_replacements). Rerun the same command: "
                "finished items are skipped."
            ) from error


def generate_on_ray(
    source: PipelineSource,
    items: list[WorkItem],
    output: str | Path,
    policy=None,
    *,
    workers: int = 1,
    progress: Callable[[WorkItem], None] | None = None,
    **pool_options,
) -> RunReport:
    """Start a :class:`GenerationPool`, generate ``items`` into ``output``, shut the pool down."""
    with GenerationPool(source, workers=workers, **pool_options) as pool:
        return pool.run(items, output, policy, progress)
