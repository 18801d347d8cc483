"""A durable outbox per sink: messages are appended to ``outbox-KEY.jsonl`` (made durable before the
inspection's file is moved on) and a delivery thread hands them to the sink one by one, in order,
advancing ``outbox-KEY.delivered`` (the count acknowledged, written atomically) only after the sink
confirmed each (KEY names the sink: its kind and a hash of its address).
A sink that is down (a broker restarting) is retried with backoff; nothing is dropped, and after a
restart the thread resumes at the first unconfirmed message: delivery is at least once, and a message
sent twice carries the same id."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from clipfusion.outputs import write_atomic


def sink_key(kind: str, address: str) -> str:
    """``KIND-HASH``: a sink's stable name in the outbox's files."""
    return f"{kind}-{hashlib.sha256(address.encode()).hexdigest()[:10]}"

logger = logging.getLogger(__name__)
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds between tries while a sink is down


class Sink(Protocol):
    name: str  # for the log
    key: str  # for the outbox's file names: stable for one address

    def send(self, message: dict[str, Any]) -> None:
        """Deliver ``message`` and return once the receiver confirmed it; raise when it could not."""

    def close(self) -> None: ...


class Outbox:
    """``folder``'s outbox, delivered to ``sink`` by a thread of its own (``start`` / ``close``)."""

    def __init__(self, folder: Path, sink: Sink) -> None:
        self.folder, self.sink = folder, sink
        self.path, self.marker = folder / f"outbox-{sink.key}.jsonl", folder / f"outbox-{sink.key}.delivered"
        self.messages: list[dict[str, Any]] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    self.messages.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: its inspection has no row either
                    break
        self.delivered = int(self.marker.read_text()) if self.marker.is_file() else 0
        self._wake, self._stop = threading.Condition(), False
        self._thread = threading.Thread(target=self._deliver, name=f"outbox-{sink.name}", daemon=True)

    @property
    def backlog(self) -> int:
        """Messages not yet confirmed by the sink."""
        return len(self.messages) - self.delivered

    def start(self) -> None:
        if self.backlog:
            logger.info("%d messages to %s from before: delivering them first", self.backlog, self.sink.name)
        self._thread.start()

    def put(self, message: dict[str, Any]) -> None:
        """Append ``message``, durably, and wake the delivery thread (from any thread: the service's
        finishing threads put concurrently; the file's order is the delivery order)."""
        with self._wake:
            with self.path.open("a", encoding="utf-8") as outbox:
                outbox.write(json.dumps(message) + "\n")
                outbox.flush()
                os.fsync(outbox.fileno())
            self.messages.append(message)
            self._wake.notify()

    def _deliver(self) -> None:
        failures = 0
        while True:
            with self._wake:
                while not self._stop and self.delivered >= len(self.messages):
                    self._wake.wait()
                if self._stop and (self.delivered >= len(self.messages) or failures):
                    return
                message = self.messages[self.delivered]
            try:
                self.sink.send(message)
            except Exception as exc:  # any sink's failure (refused, timed out, disconnected): try again later
                if failures == 0:
                    logger.warning("%s is not taking messages (%s); %d waiting, kept in %s", self.sink.name, exc,
                                   self.backlog, self.path)
                with self._wake:
                    self._wake.wait(BACKOFF[min(failures, len(BACKOFF) - 1)])
                failures += 1
                continue
            if failures:
                logger.info("%s is taking messages again", self.sink.name)
            failures = 0
            self.delivered += 1
            write_atomic(self.marker, str(self.delivered))

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what the sink takes within ``timeout`` seconds; the rest waits in the outbox for next time."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.backlog:
            logger.warning("%d messages to %s not delivered yet: they go first next time", self.backlog,
                           self.sink.name)
        self.sink.close()
