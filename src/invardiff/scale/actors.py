"""A fault-tolerant pool of Ray actors: tasks are fed to live actors, and a dead actor's tasks run again elsewhere.

The pool keeps ``IN_FLIGHT`` tasks queued per actor, so that an actor never waits for the driver between tasks.
When an actor dies (node lost, out of memory, ``ray.kill``) its unfinished tasks go back to the front of the queue,
a replacement actor is started while ``max_replacements`` allows, and the caller sees every task's result exactly
once (a task's result is yielded only when its call returned).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass


logger = logging.getLogger(__name__)

IN_FLIGHT = 2  # tasks per actor: one running, one queued in the actor


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
    local one when ``address`` is ``None``; a Ray already initialised in this process is used as it is."""
    ray = import_ray()
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
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
    """

    count: int = 1
    cpus: float = 1
    gpus: float = 0
    address: str | None = None
    max_replacements: int | None = None

    def __post_init__(self):
        if self.count < 1 or self.cpus <= 0 or self.gpus < 0:
            raise ValueError(f"Workers needs count >= 1, cpus > 0 and gpus >= 0, got {self}.")

    def threads(self, device: str) -> int | None:
        """torch CPU threads of each actor: its CPU share when it computes on the CPU, else left as they are."""
        return max(1, int(self.cpus)) if device == "cpu" else None


ONE_WORKER = Workers()  # the default: one actor with one CPU on a local Ray


class ActorPool:
    """``workers.count`` actors of ``actor_class(*args)``. The actor class must have a ``ready()`` method (the
    pool waits for it, so that loading a model happens before any task is timed)."""

    def __init__(self, actor_class, args: tuple, workers: Workers):
        self.workers = workers.count
        self.replacements_left = workers.count if workers.max_replacements is None else workers.max_replacements
        local_cpus = None if workers.address else max(workers.count, int(workers.count * workers.cpus))
        ray = init_ray(workers.address, local_cpus)
        self._actor_class = ray.remote(num_cpus=workers.cpus, num_gpus=workers.gpus)(actor_class)
        self._actor_args = args
        self.actors = [self._actor_class.remote(*args) for _ in range(workers.count)]
        ray.get([actor.ready.remote() for actor in self.actors])

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
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
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
