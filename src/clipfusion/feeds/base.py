"""The interface between ``clipfusion watch`` and what feeds it, and the watch's ledger.

A feed hands out :class:`FeedItem` s (an image already read, the name of its files, the row fields
that say where it came from, and the ledger entry that marks it taken).  The watch scores them,
records each entry in the :class:`Ledger` (durably, before anything else happens to the input) and
gives the item back to the feed (``settle``), which then moves or deletes a file, or nothing."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clipfusion.inspection.sources import Decoded

LEDGER = "watch.jsonl"


class Stopped(Exception):
    """The watch was stopped while items waited to be scored (a service that did not answer): they were not
    recorded, and are taken again next time."""


@dataclass
class FeedItem:
    """One image from a feed.  decoded: its pixels (or why it could not be read); name: the stem of
    its overlay, mask and map files; fields: row fields besides the verdict (a video's ``frame`` and
    ``frame_time``); entry: what the ledger records to mark it taken (``path`` and the feed's own keys)."""

    decoded: Decoded
    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ledger:
    """``watch.jsonl``: one line per image taken — the feed's entry plus ``taken`` (the time) and
    ``outcome`` (``scored`` with the row's index and decision, or ``failed`` with the reason) —
    appended and made durable before the input is moved on."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    self.entries.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: its input is taken again
                    continue

    def record(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as ledger:
            ledger.write(json.dumps(entry) + "\n")
            ledger.flush()
            os.fsync(ledger.fileno())
        self.entries.append(entry)


class Feed(Protocol):
    """What ``clipfusion watch`` reads from.  ``row_fields``: the row fields it adds (besides
    ``ROW_FIELDS``); ``ended``: nothing more will come (a video file's end, ``--once``)."""

    description: str
    row_fields: tuple[str, ...]

    @property
    def ended(self) -> bool: ...

    def start(self, ledger: Ledger) -> None:
        """Begin, knowing what earlier runs took (``ledger``)."""

    def take(self, limit: int, stop: threading.Event) -> list[FeedItem]:
        """Up to ``limit`` items ready now; waits a little (at most a poll) when none is, returning []."""

    def settle(self, item: FeedItem, outcome: str) -> None:
        """``item`` is scored (``outcome`` ``scored``) or failed, and recorded: move it on."""

    def recovered_entry(self, row: dict[str, Any]) -> dict[str, Any]:
        """The ledger entry of a row written just before a stop whose entry was not (its input's keys)."""

    def counters(self) -> dict[str, float]:
        """Running totals for the metrics (frames dropped, reconnections...): name → value."""

    def close(self) -> None: ...
