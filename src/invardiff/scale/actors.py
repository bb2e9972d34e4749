"""A fault-tolerant pool of Ray actors: tasks are fed to live actors, and a dead actor's tasks run again elsewhere.

The pool keeps ``IN_FLIGHT`` tasks queued per actor, so that an actor never waits for the driver between tasks.
When an actor dies (node lost, out of memory, ``ray.kill``) its unfinished tasks go back to the front of the queue,
a replacement actor is started while ``max_replacements`` allows, and the caller sees every task's result exactly
once (a task's result is yielded only when its call returned).

Before any actor starts, the pool checks that the cluster has the resources it asks for (``ray.cluster_resources()``):
Ray would otherwise queue an actor that no node can hold and wait for it forever. Every wait is bounded: the actors'
start and the tasks give up with a :class:`TimeoutError` after ``Workers.timeout`` seconds without progress (no actor
ready, no task finished), naming the resources the cluster has free.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass


logger = logging.getLogger(__name__)

IN_FLIGHT = 2  # tasks per actor: one running, one queued in the actor
POLL_SECONDS = 5.0  # how often a wait wakes up to check its deadline


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "invardiff's Ray pools need Ray: pip install 'invardiff[ray]' (or pip install 'ray>=2.30')."
        ) from error
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the Ray cluster at ``address`` (``"auto"``: the one started with ``ray start``), or start a
    local one when ``address`` is ``None`` (with ``num_cpus``, default: this machine's CPUs, and its GPUs); a Ray
    already initialised in this process is used as it is."""
    ray = import_ray()
    if not ray.is_initialized():
        if address is None:
            # Ray's own start-up lines (a local instance started, its token authentication) would stand between
            # the CLI's progress and its one-line messages; its errors still show.
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR)
        else:
            ray.init(address=address)
    return ray


@dataclass(frozen=True)
class Workers:
    """The Ray actors of a pool: how many, what each gets, where the cluster is.

    Attributes:
        count: actors; each loads the model once.
        cpus / gpus: Ray resources of each actor (an actor with GPUs runs on ``cuda``, the GPUs Ray gave it).
        address: the cluster (see :func:`init_ray`); ``None`` starts a local Ray.
        max_replacements: actors started to replace dead ones (default: ``count``); then the run fails.
        timeout: seconds the pool waits without progress (no actor ready, no task finished) before it gives up
            with a :class:`TimeoutError`; give the time of one task (a model load, one batch) with margin.
    """

    count: int = 1
    cpus: float = 1
    gpus: float = 0
    address: str | None = None
    max_replacements: int | None = None
    timeout: float = 600.0

    def __post_init__(self):
        if self.count < 1 or self.cpus <= 0 or self.gpus < 0 or not self.timeout > 0:
            raise ValueError(f"Workers needs count >= 1, cpus > 0, gpus >= 0 and timeout > 0, got {self}.")

    def threads(self, device: str) -> int | None:
        """torch CPU threads of each actor: its CPU share when it computes on the CPU, else left as they are."""
        return max(1, int(self.cpus)) if device == "cpu" else None


ONE_WORKER = Workers()  # the default: one actor with one CPU on a local Ray


def check_resources(workers: Workers, cluster: dict) -> None:
    """Refuse ``workers`` that the cluster (``ray.cluster_resources()``: its total CPUs and GPUs) cannot hold all
    at once: Ray would queue the actors that do not fit and wait for them without an end."""
    have = {"CPU": float(cluster.get("CPU", 0)), "GPU": float(cluster.get("GPU", 0))}
    need = {"CPU": workers.count * workers.cpus, "GPU": workers.count * workers.gpus}
    short = [kind for kind in ("GPU", "CPU") if need[kind] > have[kind] + 1e-9]
    if short:
        kind = short[0]
        each = workers.gpus if kind == "GPU" else workers.cpus
        raise ValueError(
            f"{workers.count} Ray worker(s) with {each:g} {kind}(s) each need {need[kind]:g} {kind}(s), but the Ray "
            f"cluster has {have['CPU']:g} CPU(s) and {have['GPU']:g} GPU(s) in all; use fewer workers or fewer "
            f"{kind}s per worker (--workers, --{kind.lower()}s-per-worker), or a cluster with more {kind}s."
        )


def connect(workers: Workers):
    """Ray, connected to ``workers``' cluster (:func:`init_ray`), once the cluster is known to hold them all
    (:func:`check_resources`)."""
    ray = init_ray(workers.address)
    check_resources(workers, ray.cluster_resources())
    return ray


def _resources(ray) -> str:
    free = ray.available_resources()
    return f"free now: {free.get('CPU', 0):g} CPU(s), {free.get('GPU', 0):g} GPU(s)"


class ActorPool:
    """``workers.count`` actors of ``actor_class(*args)``. The actor class must have a ``ready()`` method (the
    pool waits for it, so that loading a model happens before any task is timed).

    ``on_start(ready, count)`` is called as the actors become ready (first with 0). The pool refuses workers the
    cluster cannot hold (:func:`check_resources`, a ``ValueError``) and gives up on a start that makes no progress
    for ``workers.timeout`` seconds (a ``TimeoutError``)."""

    def __init__(self, actor_class, args: tuple, workers: Workers, on_start: Callable[[int, int], None] | None = None):
        self.workers = workers.count
        self.timeout = workers.timeout
        self.replacements_left = workers.count if workers.max_replacements is None else workers.max_replacements
        ray = connect(workers)
        self._actor_class = ray.remote(num_cpus=workers.cpus, num_gpus=workers.gpus)(actor_class)
        self._actor_args = args
        self.actors = [self._actor_class.remote(*args) for _ in range(workers.count)]
        try:
            self._wait_ready(on_start or (lambda ready, count: None))
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, on_start: Callable[[int, int], None]) -> None:
        ray = import_ray()
        pending = [actor.ready.remote() for actor in self.actors]
        on_start(0, len(self.actors))
        last = time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
            if not done:
                if time.monotonic() - last > self.timeout:
                    raise TimeoutError(
                        f"{len(pending)} of {len(self.actors)} Ray worker(s) did not start within {self.timeout:g} s "
                        f"({_resources(ray)}); another job may hold the resources, or a worker takes longer to load "
                        "its model (raise the timeout: --ray-timeout)."
                    )
                continue
            ray.get(done[0])  # an actor whose constructor failed raises its error here
            last = time.monotonic()
            on_start(len(self.actors) - len(pending), len(self.actors))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def results(self, tasks: list, method: str, *shared) -> Iterator[tuple]:
        """``(task, result)`` of ``actor.<method>(task, *shared)`` for every task, in completion order."""
        ray = import_ray()
        queue = deque(tasks)
        in_flight: dict = {}  # object ref -> (actor, task)
        for actor in self.actors:
            self._feed(actor, queue, in_flight, method, shared)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.timeout)
            if not done:
                raise TimeoutError(
                    f"No Ray task finished within {self.timeout:g} s ({len(in_flight)} in flight on "
                    f"{len(self.actors)} worker(s), {_resources(ray)}); rerun the same command to keep the finished "
                    "work, with a larger --ray-timeout if one task takes that long."
                )
            ref = done[0]
            actor, task = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                queue.appendleft(task)  # nothing of it reached the caller: it runs again elsewhere
                self._retire(actor, error)
                for other in self.actors:
                    self._feed(other, queue, in_flight, method, shared)
                continue
            yield task, result
            self._feed(actor, queue, in_flight, method, shared)

    def _feed(self, actor, queue: deque, in_flight: dict, method: str, shared: tuple) -> None:
        if actor not in self.actors:
            return
        while queue and sum(a is actor for a, _ in in_flight.values()) < IN_FLIGHT:
            task = queue.popleft()
            in_flight[getattr(actor, method).remote(task, *shared)] = (actor, task)

    def _retire(self, actor, error) -> None:
        """Drop a dead actor and start a replacement while ``max_replacements`` allows."""
        if actor not in self.actors:
            return  # a second task of an actor already retired
        self.actors.remove(actor)
        if self.replacements_left > 0:
            self.replacements_left -= 1
            logger.warning("a Ray worker died (%s); starting a replacement", type(error).__name__)
            self.actors.append(self._actor_class.remote(*self._actor_args))
        elif not self.actors:
            raise RuntimeError(
                "Every Ray worker died and no replacement is left (max_replacements). Rerun the same command: "
                "finished work is kept."
            ) from error
