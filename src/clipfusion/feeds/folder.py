"""A hot folder: images dropped into a folder (by a camera PC, a PLC gateway, often over a network share).

A file is taken only when complete: its size and modification time unchanged for ``settle`` seconds
(copies over a share and partial uploads are common; a file renamed into the folder is complete at once,
after the same wait).  It is taken once: the ledger keys it by path, size and modification time, so a
restart picks up what arrived while the watch was down and nothing twice, and finishes moving a file it
had scored just before it stopped.  Then the file is left, moved to ``done/`` (or ``failed/``), or deleted.

The folder is polled, which works on network shares too; where the file system reports events
(watchdog), an event wakes the poll at once, and an observer that dies (a share unmounted) is started
again and said in the log.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clipfusion.data.base import IMAGE_EXTENSIONS, MAX_PIXELS
from clipfusion.errors import ClipfusionError
from clipfusion.feeds.base import FeedItem, Ledger
from clipfusion.inspection.sources import read_source

logger = logging.getLogger(__name__)
After = Literal["keep", "move", "delete"]
AFTER: tuple[After, ...] = ("keep", "move", "delete")
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class Seen:
    """A file's identity while it waits: size and modification time, and since when they held."""

    size: int
    mtime_ns: int
    since: float


def candidates(folder: Path) -> Iterator[Path]:
    """The image files in ``folder`` (not in its done/ and failed/, not hidden: partial uploads often are)."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            yield path


class FolderFeed:
    """The complete new image files of ``folder``.  settle: seconds a file's size and time must hold;
    poll: seconds between looks; after: ``keep``, ``move`` or ``delete`` a taken file; once: end when
    nothing complete is left; events: also wake on file-system events (watchdog, where installed)."""

    row_fields: tuple[str, ...] = ()

    def __init__(self, folder: Path, settle: float = 1.0, poll: float = 0.5, after: After = "keep",
                 once: bool = False, max_pixels: int = MAX_PIXELS, events: bool = True) -> None:
        if not folder.is_dir():
            raise ClipfusionError(f"watch: {folder} is not a folder; give the folder images arrive in, or a video")
        if settle < 0 or poll <= 0:
            raise ClipfusionError("--settle must be >= 0 and --poll > 0")
        # absolute once: a file's path names it in rows and the ledger, whatever the working folder
        self.folder, self.settle_seconds, self.poll, self.after = folder.resolve(), settle, poll, after
        self.once = once
        self.description = str(self.folder)
        self.max_pixels, self.events = max_pixels, events
        self.ended = False
        self.seen: dict[Path, Seen] = {}
        self.taken: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → outcome
        self._wake = threading.Event()
        self._observer: Any = None
        self._observer_restarts = 0

    def start(self, ledger: Ledger) -> None:
        for entry in ledger.entries:
            self.taken[(entry["path"], entry["size"], entry["mtime_ns"])] = entry["outcome"]
        if self.events:
            self._observe()

    def _observe(self) -> None:
        """Start a watchdog observer that wakes the poll on any change in the folder (none where watchdog is
        not installed: polling alone then)."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            self.events = False
            return
        wake = self._wake

        class Waker(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        observer = Observer()
        observer.schedule(Waker(), str(self.folder), recursive=False)
        observer.daemon = True
        try:
            observer.start()
        except OSError as exc:  # no events on this file system (or none left): polling still works
            logger.warning("no file-system events for %s (%s): polling every %s s", self.folder, exc, self.poll)
            self.events = False
            return
        self._observer = observer

    def _check_observer(self) -> None:
        if self._observer is not None and not self._observer.is_alive():
            self._observer_restarts += 1
            logger.warning("the file-system observer of %s stopped (share unmounted?): starting it again; polling "
                           "goes on meanwhile", self.folder)
            self._observer = None
            if self.folder.is_dir():
                self._observe()

    def ready(self, now: float) -> list[tuple[Path, os.stat_result]]:
        """The files whose size and time have held for ``settle`` seconds and that were not taken before;
        a file taken before but still here (stopped between its row and its move) is finished now."""
        ready = []
        present = set()
        try:
            paths = list(candidates(self.folder))
        except OSError as exc:  # the share went away: say so, and look again at the next poll
            logger.warning("cannot list %s: %s", self.folder, exc.strerror or exc)
            return []
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:  # moved away meanwhile
                continue
            present.add(path)
            earlier = self.taken.get((str(path), stat.st_size, stat.st_mtime_ns))
            if earlier is not None:
                self._dispose(path, earlier)
                continue
            seen = self.seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self.seen[path] = Seen(stat.st_size, stat.st_mtime_ns, now)
            elif now - seen.since >= self.settle_seconds:
                ready.append((path, stat))
        for gone in set(self.seen) - present:
            del self.seen[gone]
        return ready

    def take(self, limit: int, stop: threading.Event) -> list[FeedItem]:
        self._check_observer()
        # both before the look: a change during it wakes the next wait (it would be missed after)
        self._wake.clear()
        listed = self._folder_mtime()
        ready = self.ready(time.monotonic())
        if not ready:
            if self.once and not self.seen:
                self.ended = True
                return []
            # look again after a poll, or when the first waiting file may have settled, or at once on an event
            wake_at = time.monotonic() + self.poll
            if self.seen:
                wake_at = min(wake_at, min(seen.since for seen in self.seen.values()) + self.settle_seconds)
            # the folder's own modification time changes as soon as a file is added, renamed in or removed (one
            # stat; the observer's events of a rename wait behind those of the last move to done/, half a second)
            while not stop.is_set() and time.monotonic() < wake_at:
                if self._wake.wait(min(0.05, self.poll)) or self._folder_mtime() != listed:
                    break
            return []
        items = []
        for path, stat in ready[:limit]:
            entry = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            items.append(FeedItem(read_source(path, self.max_pixels), path.stem, entry=entry))
        return items

    def _folder_mtime(self) -> int:
        try:
            return self.folder.stat().st_mtime_ns
        except OSError:  # the share went away: the next look says so
            return -1

    def settle(self, item: FeedItem, outcome: str) -> None:
        entry = item.entry
        self.taken[(entry["path"], entry["size"], entry["mtime_ns"])] = outcome
        path = Path(entry["path"])
        self.seen.pop(path, None)
        self._dispose(path, outcome)

    def recovered_entry(self, row: dict[str, Any]) -> dict[str, Any]:
        path = Path(row["path"])
        stat = path.stat() if path.is_file() else None
        return {"path": row["path"], "size": stat.st_size if stat else -1, "mtime_ns": stat.st_mtime_ns if stat else -1}

    def _dispose(self, path: Path, outcome: str) -> None:
        """Leave, move (to done/ or failed/) or delete a taken file."""
        try:
            if self.after == "delete":
                path.unlink(missing_ok=True)
            elif self.after == "move":
                folder = self.folder / (DONE if outcome == "scored" else FAILED)
                folder.mkdir(exist_ok=True)
                target = folder / path.name
                if target.exists():  # a name used again by the camera: keep both
                    target = folder / f"{path.stem}-{time.time_ns()}{path.suffix}"
                shutil.move(str(path), str(target))
        except OSError as exc:  # a file held open elsewhere: taken already, left where it is
            logger.warning("could not %s %s after scoring it: %s", self.after, path, exc.strerror)

    def counters(self) -> dict[str, float]:
        return {"files_waiting": len(self.seen), "observer_restarts_total": self._observer_restarts}

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
