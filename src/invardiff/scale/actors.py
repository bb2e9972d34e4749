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


class ActorPool:
    """``workers`` actors of ``actor_class(*args)``, each with ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs.

    The actor class must have a ``ready()`` method (the pool waits for it, so that loading a model happens before
    any task is timed).
    """

    def __init__(
        self,
        actor_class,
        args: tuple,
        *,
        workers: int = 1,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        max_replacements: int | None = None,
        address: str | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}.")
        self.workers = workers
        self.replacements_left = workers if max_replacements is None else max_replacements
        ray = init_ray(address, None if address else max(workers, int(workers * cpus_per_worker)))
        self._actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(actor_class)
        self._actor_args = args
        self.actors = [self._actor_class.remote(*args) for _ in range(workers)]
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
