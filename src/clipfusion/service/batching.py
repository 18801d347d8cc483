"""Dynamic batching over model replicas: concurrent requests for one model are coalesced into batches of
up to ``max_batch`` items and ``max_weight`` weight (an image's pixels: one large image goes alone
instead of holding up a batch of small ones), waiting at most ``max_wait_ms`` for a batch to fill; each
batch runs on the first free of ``replicas`` model threads, so the event loop never blocks on a model and
one slow batch does not stop the others.  A bounded queue refuses work it cannot hold (the caller
answers 503) instead of growing without bound."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
Outcome = TypeVar("Outcome")


class QueueFullError(Exception):
    """The model's queue holds ``max_queue`` images already: try again later."""


class ShuttingDownError(Exception):
    """The service is stopping and accepts no new work."""


@dataclass
class _Job(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


class Batcher(Generic[Item, Result]):
    """Runs ``process(items, replica) -> results`` (same length, same order) on batches of submitted items,
    each batch in the thread of a free replica (``replica``: its index, 0 .. replicas - 1).

    ``weigh(item)`` is an item's weight (default 1); a batch holds at most ``max_weight`` of it, and at
    least one item.  ``on_batch(size, seconds, replica)`` is told each batch's size, time and replica (for
    metrics).
    """

    def __init__(self, name: str, process: Callable[[list[Item], int], Sequence[Result]], max_batch: int,
                 max_wait_ms: float, max_queue: int, on_batch: Callable[[int, float, int], None] | None = None,
                 replicas: int = 1, weigh: Callable[[Item], int] | None = None, max_weight: int | None = None
                 ) -> None:
        self.name, self.process = name, process
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.on_batch, self.replicas = on_batch, replicas
        self.weigh, self.max_weight = weigh or (lambda _item: 1), max_weight
        self._queue: asyncio.Queue[_Job[Item, Result]] | None = None
        self._carried: _Job[Item, Result] | None = None  # taken from the queue, too heavy for the last batch
        self._free: asyncio.Queue[int] | None = None  # the replicas not running a batch
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}-{n}")
                           for n in range(replicas)]
        self._closing = False
        self._forming = False  # a batch is between leaving the queue and running on a replica

    @property
    def depth(self) -> int:
        """Images waiting (not yet in a running batch)."""
        return (0 if self._queue is None else self._queue.qsize()) + (self._carried is not None)

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._free = asyncio.Queue()
        for replica in range(self.replicas):
            self._free.put_nowait(replica)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue every item (all or none: a request is refused whole when they do not all fit) and wait
        for their results."""
        if self._closing or self._queue is None:
            raise ShuttingDownError(self.name)
        if self.depth + len(items) > self.max_queue:
            raise QueueFullError(self.name)
        loop = asyncio.get_running_loop()
        jobs = [_Job(item, loop.create_future()) for item in items]
        for job in jobs:
            self._queue.put_nowait(job)
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def run_exclusive(self, task: Callable[[], Outcome]) -> Outcome:
        """Run ``task`` while no replica runs a batch (every replica waits for it: a model swap reaches all of
        them before their next batch)."""
        assert self._free is not None
        held = [await self._free.get() for _ in range(self.replicas)]
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executors[0], task)
        finally:
            for replica in held:
                self._free.put_nowait(replica)

    async def _next_batch(self) -> tuple[list[_Job[Item, Result]], int]:
        """The next batch and the replica to run it: the first job waited for, then a free replica, then
        more jobs while they fit and ``max_wait`` allows.  The batch is gathered once a replica is free, so
        that the jobs queued while every replica was busy go into it (gathered earlier, it would hold only
        the first and a replica would run batches of one); and no replica is held while the queue is empty
        (``run_exclusive`` needs them all)."""
        assert self._queue is not None and self._free is not None
        loop = asyncio.get_running_loop()
        first = self._carried or await self._queue.get()
        self._carried, self._forming = None, True
        replica = await self._free.get()
        batch, weight = [first], self.weigh(first.item)
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0 and self._queue.empty():
                break
            try:
                job = (await asyncio.wait_for(self._queue.get(), timeout=max(remaining, 0.0))
                       if self._queue.empty() else self._queue.get_nowait())
            except asyncio.TimeoutError:
                break
            if self.max_weight is not None and weight + self.weigh(job.item) > self.max_weight:
                self._carried = job  # it opens the next batch
                break
            batch.append(job)
            weight += self.weigh(job.item)
        return batch, replica

    async def _run(self) -> None:
        while True:
            batch, replica = await self._next_batch()
            task = asyncio.get_running_loop().create_task(self._deliver_on(batch, replica))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            self._forming = False

    async def _deliver_on(self, jobs: list[_Job[Item, Result]], replica: int) -> None:
        assert self._free is not None
        try:
            await self._deliver([job for job in jobs if not job.future.done()], replica)  # skip clients that left
        finally:
            self._free.put_nowait(replica)

    async def _deliver(self, jobs: list[_Job[Item, Result]], replica: int) -> None:
        if not jobs:
            return
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executors[replica], self.process,
                                                                       [job.item for job in jobs], replica)
        except Exception as exc:
            if len(jobs) > 1:  # one item may have failed them all: each runs again alone, and fails alone
                for job in jobs:
                    await self._deliver([job], replica)
                return
            if not jobs[0].future.done():
                jobs[0].future.set_exception(exc)
            return
        if self.on_batch:
            self.on_batch(len(jobs), time.perf_counter() - start, replica)
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    async def close(self) -> None:
        """Accept nothing new, finish every queued item, then stop the threads."""
        self._closing = True
        while self.depth or self._forming or self._running:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
        for executor in self._executors:
            executor.shutdown(wait=True)
