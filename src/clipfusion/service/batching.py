"""Dynamic batching: concurrent requests for one model are coalesced into batches of up to
``max_batch`` images, waiting at most ``max_wait_ms`` for a batch to fill; a bounded queue refuses
work it cannot hold (the caller answers 503) instead of growing without bound.  The model runs in
the batcher's own thread, so the event loop never blocks on it."""
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
    """Runs ``process(items) -> results`` (same length, same order) on batches of submitted items.

    ``on_batch(size, seconds)`` is told each batch's size and time (for metrics).
    """

    def __init__(self, name: str, process: Callable[[list[Item]], Sequence[Result]], max_batch: int,
                 max_wait_ms: float, max_queue: int, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.name, self.process = name, process
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Job[Item, Result]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._closing = False
        self._busy = False  # a batch is between leaving the queue and its results being delivered

    @property
    def depth(self) -> int:
        """Images waiting (not yet in a running batch)."""
        return 0 if self._queue is None else self._queue.qsize()

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Queue every item (all or none: a request is refused whole when they do not all fit) and wait
        for their results."""
        if self._closing or self._queue is None:
            raise ShuttingDownError(self.name)
        if self._queue.qsize() + len(items) > self.max_queue:
            raise QueueFullError(self.name)
        loop = asyncio.get_running_loop()
        jobs = [_Job(item, loop.create_future()) for item in items]
        for job in jobs:
            self._queue.put_nowait(job)
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def run_exclusive(self, task: Callable[[], Outcome]) -> Outcome:
        """Run ``task`` in the model's thread between batches (no batch runs meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, task)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            self._busy = True
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout=max(remaining, 0.0))
                                 if self._queue.empty() else self._queue.get_nowait())
                except asyncio.TimeoutError:
                    break
            await self._deliver([job for job in batch if not job.future.done()])  # skip clients that left
            self._busy = False

    async def _deliver(self, jobs: list[_Job[Item, Result]]) -> None:
        if not jobs:
            return
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.process,
                                                                       [job.item for job in jobs])
        except Exception as exc:
            if len(jobs) > 1:  # one item may have failed them all: each runs again alone, and fails alone
                for job in jobs:
                    await self._deliver([job])
                return
            if not jobs[0].future.done():
                jobs[0].future.set_exception(exc)
            return
        if self.on_batch:
            self.on_batch(len(jobs), time.perf_counter() - start)
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    async def close(self) -> None:
        """Accept nothing new, finish every queued item, then stop the thread."""
        self._closing = True
        while self._queue is not None and (not self._queue.empty() or self._busy):
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)
