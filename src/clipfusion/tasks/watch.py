"""``clipfusion watch FOLDER``: a hot folder on the line.  Images dropped into the folder are scored
by the one inspection core as they arrive, each written as ``predict`` writes it (a row in
results.jsonl/csv, its overlay, mask, raw map and thumbnail), until the process is stopped.

A file is taken only when complete: its size and modification time unchanged for ``settle`` seconds
(copies over a share and partial uploads are common; a file renamed into the folder is complete at
once, after the same wait).  Each image is scored once: ``watch.jsonl`` in ``--out`` records every file
taken (its path, size and modification time, and what became of it), so a restart resumes without
scoring an image twice, picks up what arrived while it was down, and finishes moving a file it had
scored just before it stopped.  Then the file is left, moved to ``done/`` (or ``failed/`` when it
could not be read), or deleted (``after``).  The folder is polled, which also works on network shares
where file-system events do not arrive.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Literal

from clipfusion.data.base import IMAGE_EXTENSIONS
from clipfusion.errors import ClipfusionError
from clipfusion.inspection.core import InspectionSettings, Inspector
from clipfusion.inspection.writer import ROW_FIELDS, ImageWriter, render_all
from clipfusion.outputs import json_text, read_json, write_atomic
from clipfusion.publishing.message import inspection_message
from clipfusion.publishing.outbox import Outbox
from clipfusion.row_log import RowLog

logger = logging.getLogger(__name__)
After = Literal["keep", "move", "delete"]
AFTER: tuple[After, ...] = ("keep", "move", "delete")
LEDGER = "watch.jsonl"
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class Seen:
    """A file's identity while it waits: size and modification time, and since when they held."""

    size: int
    mtime_ns: int
    since: float


@dataclass
class Ledger:
    """``watch.jsonl``: one line per file taken — path, size, mtime, and ``outcome`` (``scored`` with the
    row's index, or ``failed`` with the reason) — appended and made durable before the file is moved."""

    path: Path
    taken: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: its file is taken again
                    continue
                self.taken[(entry["path"], entry["size"], entry["mtime_ns"])] = entry

    def record(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as ledger:
            ledger.write(json.dumps(entry) + "\n")
            ledger.flush()
            os.fsync(ledger.fileno())
        self.taken[(entry["path"], entry["size"], entry["mtime_ns"])] = entry


@dataclass(frozen=True)
class WatchJob:
    """folder: where images arrive; out: where rows and files go (not inside ``folder``); settle: seconds a
    file's size and time must hold; poll: seconds between looks; after: what to do with a taken file;
    batch_size: images scored at once when several are ready; once: score what is complete, then stop."""

    folder: Path
    out: Path
    settle: float = 1.0
    poll: float = 0.5
    after: After = "keep"
    batch_size: int = 8
    once: bool = False

    def __post_init__(self) -> None:
        if not self.folder.is_dir():
            raise ClipfusionError(f"watch: {self.folder} is not a folder; give the folder images arrive in")
        if self.folder.resolve() == self.out.resolve() or self.folder.resolve() in self.out.resolve().parents:
            raise ClipfusionError(f"--out {self.out} is inside the watched folder {self.folder}: put the results "
                                  "elsewhere, or its overlays would be watched too")
        if self.settle < 0 or self.poll <= 0 or self.batch_size < 1:
            raise ClipfusionError("--settle must be >= 0, --poll > 0 and --batch-size >= 1")


def _candidates(folder: Path) -> Iterator[Path]:
    """The image files in ``folder`` (not in its done/ and failed/, not hidden: partial uploads often are)."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            yield path


class Watcher:
    """Scores the complete new files of ``job.folder`` with ``inspector`` until ``stop`` is set; each
    verdict is also published through every one of ``outboxes`` (``publishing``)."""

    def __init__(self, job: WatchJob, inspector: Inspector, settings: InspectionSettings,
                 outboxes: Sequence[Outbox] = ()) -> None:
        self.job, self.inspector, self.settings, self.outboxes = job, inspector, settings, list(outboxes)
        self.seen: dict[Path, Seen] = {}
        self.stop = threading.Event()
        job.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(job.out / LEDGER)
        self.writer = ImageWriter(job.out)
        state = job.out / "watch.json"
        # the run's id, kept across restarts: message ids (run id + row) are the same however often sent
        self.run_id = read_json(state, "the watch's state")["run_id"] if state.is_file() else uuid.uuid4().hex
        write_atomic(state, json_text({"run_id": self.run_id, "folder": str(job.folder.resolve()),
                                       "model_id": settings.model_id, "image_threshold": settings.decisions.image,
                                       "pixel_threshold": settings.decisions.pixel}))

    def message_id(self, row: int) -> str:
        return f"{self.run_id}-{row:06d}"

    def recover(self, log: RowLog) -> None:
        """Rows written just before a stop whose file has no ledger line (or message) yet get them now, so
        that their file is not scored again and their verdict not left unpublished."""
        recorded = {(entry["path"], entry.get("taken")) for entry in self.ledger.taken.values()}
        queued = [{message["id"] for message in outbox.messages} for outbox in self.outboxes]
        for index, row in enumerate(log.rows):
            for outbox, ids in zip(self.outboxes, queued, strict=True):
                if self.message_id(index) not in ids:
                    outbox.put(inspection_message(self.message_id(index), row, self.settings.category))
            if (row["path"], row.get("timestamp")) not in recorded:
                path = Path(row["path"])
                stat = path.stat() if path.is_file() else None
                self.ledger.record({"path": row["path"], "size": stat.st_size if stat else -1,
                                    "mtime_ns": stat.st_mtime_ns if stat else -1, "taken": row.get("timestamp"),
                                    "outcome": "scored", "row": index, "decision": row.get("decision")})

    def ready(self, now: float) -> list[tuple[Path, os.stat_result]]:
        """The files whose size and time have held for ``settle`` seconds and that were not taken before;
        a file taken before but still here (stopped between its row and its move) is finished now."""
        ready = []
        present = set()
        for path in _candidates(self.job.folder):
            try:
                stat = path.stat()
            except FileNotFoundError:  # moved away meanwhile
                continue
            present.add(path)
            earlier = self.ledger.taken.get((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
            if earlier is not None:
                self._dispose(path, earlier["outcome"])
                continue
            seen = self.seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self.seen[path] = Seen(stat.st_size, stat.st_mtime_ns, now)
            elif now - seen.since >= self.job.settle:
                ready.append((path, stat))
        for gone in set(self.seen) - present:
            del self.seen[gone]
        return ready

    def score(self, files: list[tuple[Path, os.stat_result]], log: RowLog) -> None:
        """Inspect ``files`` as one batch; each gets its row (or its reason) and ledger line, then is disposed of."""
        outcomes = render_all(self.inspector.inspect([str(path.resolve()) for path, _ in files]), self.settings)
        for (path, stat), outcome in zip(files, outcomes, strict=True):
            entry: dict[str, Any] = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                     "taken": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
            if isinstance(outcome, tuple):
                logger.warning("skipped %s: %s", *outcome)
                entry.update(outcome="failed", reason=outcome[1])
            else:
                start = time.perf_counter()
                row = self.writer.write(f"{len(log.rows):06d}_{PurePath(outcome.source).stem}", outcome)
                row = {**row, "seconds": round(outcome.seconds + time.perf_counter() - start, 4),
                       "timestamp": entry["taken"]}
                log.append(row)
                index = len(log.rows) - 1
                for outbox in self.outboxes:
                    outbox.put(inspection_message(self.message_id(index), row, self.settings.category))
                entry.update(outcome="scored", row=index, decision=row["decision"])
            self.ledger.record(entry)
            self.seen.pop(path, None)
            self._dispose(path, entry["outcome"])

    def _dispose(self, path: Path, outcome: str) -> None:
        """Leave, move (to done/ or failed/) or delete a taken file."""
        try:
            if self.job.after == "delete":
                path.unlink(missing_ok=True)
            elif self.job.after == "move":
                folder = self.job.folder / (DONE if outcome == "scored" else FAILED)
                folder.mkdir(exist_ok=True)
                target = folder / path.name
                if target.exists():  # a name used again by the camera: keep both
                    target = folder / f"{path.stem}-{time.time_ns()}{path.suffix}"
                shutil.move(str(path), str(target))
        except OSError as exc:  # a file held open elsewhere: taken already, left where it is
            logger.warning("could not %s %s after scoring it: %s", self.job.after, path, exc.strerror)

    def run(self, on_batch: Callable[[int], None] | None = None) -> int:
        """Watch until ``stop`` is set (or, with ``once``, until nothing complete is left); the files scored."""
        with RowLog(self.job.out, ROW_FIELDS) as log:
            self.recover(log)
            for outbox in self.outboxes:
                outbox.start()
            try:
                scored = self._watch(log, on_batch)
            finally:  # what the sinks take in a few seconds is delivered; the rest waits in the outboxes
                for outbox in self.outboxes:
                    outbox.close()
        return scored

    def _watch(self, log: RowLog, on_batch: Callable[[int], None] | None) -> int:
        """The polling loop: batches of ready files scored until ``stop`` (or, with ``once``, the end)."""
        scored = 0
        while not self.stop.is_set():
            ready = self.ready(time.monotonic())
            for begin in range(0, len(ready), self.job.batch_size):
                batch = ready[begin:begin + self.job.batch_size]
                self.score(batch, log)
                scored += len(batch)
                if on_batch is not None:
                    on_batch(len(batch))
            if self.job.once and not ready and not self.seen:
                break
            if not ready:
                self.stop.wait(self.job.poll)
        return scored
