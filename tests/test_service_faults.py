"""The service under faults: SIGTERM under load loses no accepted request, kill -9 loses nothing
recorded, and the batcher coalesces, refuses when full and drains on close."""
from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from clipfusion.service.batching import Batcher, QueueFullError, ShuttingDownError

from .servers import Server, start_server


class Load:
    """Clients posting one image per request until told to stop or the server is gone, each on one
    kept-alive connection (reopened when the server closes it); every outcome kept by file name."""

    def __init__(self, server: Server, image: bytes, clients: int = 4) -> None:
        self.server, self.image = server, image
        self.answered: dict[str, str] = {}  # file name → inspection id (200)
        self.answered_at: dict[str, float] = {}  # file name → time.monotonic() of its answer
        self.refused: dict[str, tuple[int, str]] = {}  # file name → status and code (503 while stopping)
        self.unanswered: dict[str, str] = {}  # file name → transport error and its text
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def _client(self, number: int) -> None:
        index = 0
        with httpx.Client(timeout=120) as client:
            while not self.stopped.is_set():
                name = f"load-{number}-{index}.png"
                index += 1
                try:
                    answer = client.post(f"{self.server.url}/v1/models/disc/inspect",
                                         files={"files": (name, self.image, "image/png")})
                except httpx.TransportError as exc:
                    with self.lock:
                        self.unanswered[name] = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, httpx.ConnectError):
                        return  # the server is gone
                    continue
                with self.lock:
                    if answer.status_code == 200:
                        self.answered[name] = answer.json()["inspections"][0]["id"]
                        self.answered_at[name] = time.monotonic()
                    else:
                        self.refused[name] = (answer.status_code, answer.json()["code"])
                if answer.status_code == 503:  # a well-behaved client waits as it is told (here at most 1 s)
                    time.sleep(min(float(answer.headers["Retry-After"]), 1.0))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def wait_for(self, count: int, limit: float = 120) -> None:
        deadline = time.monotonic() + limit
        while len(self.answered) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.answered) >= count, f"only {len(self.answered)} answers in {limit} s"

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=120)


def _recorded(data: Path) -> dict[str, str]:
    """file name → inspection id, read straight from the SQLite file."""
    with sqlite3.connect(data / "inspections.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return dict(connection.execute("SELECT filename, id FROM inspections").fetchall())


def test_sigterm_under_load_drains_without_a_reset_or_a_lost_answer(model, synthetic_root, tmp_path):
    """Four clients on kept-alive connections, then SIGTERM: the requests in flight are answered after
    the signal and recorded, the ones that arrive while the service drains are answered 503
    ``shutting_down`` (not reset, not dropped), and no connection is reset; then the service exits."""
    image = next((synthetic_root / "disc" / "test" / "hole").iterdir()).read_bytes()
    server = start_server([model], tmp_path / "data", "--max-batch", "4")
    with Load(server, image) as load:
        load.wait_for(12)
        signalled = time.monotonic()
        # the drain ends when nothing is in flight; uvicorn then shuts down and exits by the signal it got
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
    recorded = _recorded(tmp_path / "data")
    assert {name: recorded[name] for name in load.answered} == load.answered  # every answer is recorded
    assert set(recorded) == set(load.answered)  # and nothing was recorded without its answer
    assert any(at > signalled for at in load.answered_at.values())  # work in flight at the signal finished
    assert set(load.refused.values()) == {(503, "shutting_down")}  # late arrivals were told, not dropped
    # once the drain is over the port is closed: a client sees a refused connection, never a reset one
    assert all(error.startswith("ConnectError") for error in load.unanswered.values()), load.unanswered
    assert not set(load.unanswered) & set(recorded)


def test_kill_9_under_load_then_restart_keeps_everything_answered(model, synthetic_root, tmp_path):
    image = next((synthetic_root / "disc" / "test" / "good").iterdir()).read_bytes()
    data = tmp_path / "data"
    kept = tmp_path / "uploads"
    server = start_server([model], data, "--store-images", str(kept))
    with Load(server, image) as load:
        load.wait_for(10)
        server.stop(signal.SIGKILL)
    # the kill landed mid-work: requests had been sent and were never answered
    assert any(not error.startswith("ConnectError") for error in load.unanswered.values()), load.unanswered
    stored = [kept / f"{identifier}.png" for identifier in load.answered.values()]
    assert all(path.read_bytes() == image for path in stored)
    restarted = start_server([model], data, "--store-images", str(kept), "--keep-days", "0")  # prunes at start
    try:
        listed = httpx.get(f"{restarted.url}/v1/inspections", params={"limit": 500}).json()["items"]
        by_name = {item["filename"]: item["id"] for item in listed}
        assert {name: by_name.get(name) for name in load.answered} == load.answered  # rows stay...
        assert not any(path.exists() for path in stored)  # ...their stored uploads are gone
        files = data / "files"
        for identifier in load.answered.values():  # and their overlays, masks, maps and thumbnails
            assert not list(files.glob(f"*/{identifier}.*")), identifier
        pruned = httpx.get(f"{restarted.url}/v1/inspections/{next(iter(load.answered.values()))}/overlay.png")
        assert pruned.status_code == 404 and pruned.json()["code"] == "pruned"
        free = [line for line in httpx.get(f"{restarted.url}/metrics").text.splitlines()
                if line.startswith("clipfusion_disk_free_bytes ")]
        assert free and float(free[0].split()[1]) > 0
        assert httpx.post(f"{restarted.url}/v1/models/disc/inspect",
                          files={"files": ("after.png", image, "image/png")}, timeout=60).status_code == 200
    finally:
        restarted.stop()
    assert "after.png" in _recorded(data)


def test_the_batcher_coalesces_refuses_when_full_and_drains_on_close():
    batches: list[list[int]] = []

    def double(items: list[int], replica: int) -> list[int]:
        time.sleep(0.05)  # a model pass: the next requests queue meanwhile
        batches.append(items)
        return [2 * item for item in items]

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher("t", double, max_batch=4, max_wait_ms=20, max_queue=6)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit_many([n]) for n in range(6)))
        assert [a[0] for a in answers] == [2 * n for n in range(6)]
        assert max(len(b) for b in batches) == 4 and sum(len(b) for b in batches) == 6
        with pytest.raises(QueueFullError):
            await batcher.submit_many(list(range(7)))
        pending = asyncio.ensure_future(batcher.submit_many([10, 11, 12]))
        await asyncio.sleep(0)
        await batcher.close()
        assert await pending == [20, 22, 24]  # queued before close: finished, not dropped
        with pytest.raises(ShuttingDownError):
            await batcher.submit_many([1])

    # in a thread of its own: Playwright's sync API keeps an event loop running in the main thread
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, scenario()).result(timeout=60)


def test_a_heavy_item_goes_alone_and_holds_up_only_its_own_replica():
    """Batches are capped by weight (pixels): the heavy item runs alone, and while it blocks one replica
    the light items sent after it run and are answered on the other; a model swap (run_exclusive)
    waits until no replica runs a batch."""
    release = threading.Event()
    batches: list[tuple[int, list[int]]] = []

    def process(items: list[int], replica: int) -> list[int]:
        batches.append((replica, items))
        if 100 in items:
            assert release.wait(timeout=30)  # the heavy item: held until the test has seen the others pass
        return [item + 1 for item in items]

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher("t", process, max_batch=8, max_wait_ms=5, max_queue=16, replicas=2,
                                             weigh=lambda item: item, max_weight=100)
        batcher.start()
        heavy = asyncio.ensure_future(batcher.submit_many([100]))
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(batcher.submit_many([1, 2, 3]), timeout=10) == [2, 3, 4]
        assert not heavy.done()  # the light ones passed it
        swap = asyncio.ensure_future(batcher.run_exclusive(lambda: len(batches)))
        await asyncio.sleep(0.05)
        assert not swap.done()  # a replica still runs the heavy batch
        release.set()
        assert await heavy == [101] and await swap == 2
        await batcher.close()

    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, scenario()).result(timeout=60)
    assert [items for _, items in batches] == [[100], [1, 2, 3]]  # never batched together
    assert batches[0][0] != batches[1][0]  # on two replicas
