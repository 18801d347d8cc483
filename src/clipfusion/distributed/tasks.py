"""Calls of one function as Ray tasks, each with one worker's CPUs and GPUs, at most ``workers`` at
once, their results handed back in the calls' order."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from clipfusion.errors import ClipfusionError
from clipfusion.ray_cluster import RayOptions

# A task whose worker died (a lost node, a kill) runs again, at most this many times.
TASK_RETRIES = 3


def run_tasks(ray: Any, options: RayOptions, function: Callable[..., Any], shared: tuple[Any, ...],
              calls: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
    """``function(*shared, *call)`` for each call, on Ray; ``shared`` is put in the object store once.
    A ClipfusionError raised in a task is raised here as itself (one line for the user); on any error
    or interrupt the tasks still running are cancelled."""
    remote = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                        max_retries=TASK_RETRIES)(function)
    shared_refs = [ray.put(value) for value in shared]
    waiting = list(enumerate(calls))
    running: dict[Any, int] = {}
    finished: dict[int, Any] = {}
    following = 0
    try:
        while waiting or running:
            while waiting and len(running) < options.workers:
                index, call = waiting.pop(0)
                running[remote.remote(*shared_refs, *call)] = index
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                index = running.pop(ref)
                try:
                    finished[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, ClipfusionError):
                        raise exc.cause from None
                    raise
            while following in finished:
                yield finished.pop(following)
                following += 1
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
