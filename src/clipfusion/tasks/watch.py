"""``clipfusion watch SOURCE``: inspection on the line, until stopped.  SOURCE is a hot folder
(:mod:`clipfusion.feeds.folder`) or a video file, stream or camera (:mod:`clipfusion.feeds.video`);
each image is scored by the one inspection core and written as ``predict`` writes it (a row in
results.jsonl/csv, its overlay, mask, raw map and thumbnail), and its verdict published through each
outbox (:mod:`clipfusion.publishing`).

Each image is scored once: ``watch.jsonl`` in ``--out`` records every image taken (made durable before
the input is moved on), so a restart resumes without scoring anything twice; a row written just before a
stop whose ledger line or message was not yet written gets them on the next start.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipfusion.errors import ClipfusionError
from clipfusion.feeds.base import LEDGER, Feed, FeedItem, Ledger, Stopped
from clipfusion.feeds.folder import After, FolderFeed
from clipfusion.feeds.video import FileTrigger, MqttTrigger, Sampling, Trigger, VideoFeed, is_video
from clipfusion.inspection.core import InspectionSettings, Inspector
from clipfusion.inspection.drift import ALARM, DriftMonitor
from clipfusion.inspection.writer import ROW_FIELDS, ImageWriter, Outcome, Pictures, render_all
from clipfusion.outputs import json_text, read_json, write_atomic
from clipfusion.publishing.message import inspection_message
from clipfusion.publishing.outbox import Outbox
from clipfusion.row_log import RowLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedOptions:
    """How ``watch`` reads its SOURCE (see :class:`FolderFeed` and :class:`VideoFeed`)."""

    settle: float = 1.0
    poll: float = 0.5
    after: After = "keep"
    once: bool = False
    every: int = 1
    fps: float | None = None
    trigger: str | None = None
    queue: int = 4
    open_timeout: float = 10.0
    read_timeout: float = 5.0
    frozen_after: float = 10.0


def open_feed(source: str, out: Path, options: FeedOptions, max_pixels: int) -> Feed:
    """The feed of ``watch SOURCE``: a video (a file with a video suffix, a stream URL, ``/dev/videoN``) or a
    folder.  Options that do not apply to the source are refused, not ignored."""
    if is_video(source):
        if options.after != "keep":
            raise ClipfusionError(f"--after {options.after} moves files of a folder; a video is left as it is: drop it")
        trigger: Trigger | None = None
        if options.trigger is not None:
            trigger = MqttTrigger(options.trigger) if options.trigger.startswith(("mqtt://", "mqtts://")) else \
                FileTrigger(Path(options.trigger))
        return VideoFeed(source, Sampling(options.every, options.fps, trigger), options.queue, options.open_timeout,
                         options.read_timeout, options.frozen_after, options.once, max_pixels)
    if options.every != 1 or options.fps is not None or options.trigger is not None:
        raise ClipfusionError(f"--every, --fps and --trigger sample a video; {source} is a folder: drop them")
    folder = Path(source)
    if folder.is_dir() and (folder.resolve() == out.resolve() or folder.resolve() in out.resolve().parents):
        raise ClipfusionError(f"--out {out} is inside the watched folder {folder}: put the results elsewhere, or its "
                              "overlays would be watched too")
    return FolderFeed(folder, options.settle, options.poll, options.after, options.once, max_pixels)


@dataclass(frozen=True)
class Judge:
    """What scores the watch's images: ``inspect(items, stop)`` gives one outcome per item (rendered, or
    its source and why it has none); the model's category and id and its thresholds name it in rows,
    messages and ``watch.json``; ``drift``: the score-drift monitor of its verdicts (None: a service judges,
    and monitors, them)."""

    inspect: Callable[[Sequence[FeedItem], threading.Event], list[Outcome]]
    category: str | None
    model_id: str | None
    image_threshold: float | None
    pixel_threshold: float | None
    drift: DriftMonitor | None = None


def local_judge(inspector: Inspector, settings: InspectionSettings, pictures: Pictures = "all",
                drift: DriftMonitor | None = None) -> Judge:
    """The model loaded here, through the one inspection core; ``pictures``: which images keep their overlay,
    thumbnail and raw map; ``drift``: the monitor of its verdicts."""
    def inspect(items: Sequence[FeedItem], _stop: threading.Event) -> list[Outcome]:
        return render_all(inspector.inspect_decoded([item.decoded for item in items]), settings, pictures)

    return Judge(inspect, settings.category, settings.model_id, settings.decisions.image, settings.decisions.pixel,
                 drift)


def run_id(out: Path) -> str:
    """The watch's run id, kept in ``out/watch.json`` across restarts (message ids are the run id and the
    row, the same however often sent); a new one for a new ``out``."""
    state = out / "watch.json"
    return str(read_json(state, "the watch's state")["run_id"]) if state.is_file() else uuid.uuid4().hex


class Watcher:
    """Scores what ``feed`` gives with ``judge`` until ``stop`` is set (or the feed ends), ``batch_size``
    images at once when several are ready, writing rows into ``out``; each verdict is also published
    through every one of ``outboxes``."""

    def __init__(self, feed: Feed, out: Path, judge: Judge, outboxes: Sequence[Outbox] = (), batch_size: int = 8,
                 identifier: str | None = None) -> None:
        if batch_size < 1:
            raise ClipfusionError("--batch-size must be >= 1")
        self.feed, self.out, self.judge = feed, out, judge
        self.outboxes, self.batch_size = list(outboxes), batch_size
        self.stop = threading.Event()
        self.scored = self.failed = 0
        out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(out / LEDGER)
        self.writer = ImageWriter(out)
        self.run_id = identifier or run_id(out)
        write_atomic(out / "watch.json", json_text({"run_id": self.run_id, "source": feed.description,
                                                    "model_id": judge.model_id,
                                                    "image_threshold": judge.image_threshold,
                                                    "pixel_threshold": judge.pixel_threshold}))

    def message_id(self, row: int) -> str:
        return f"{self.run_id}-{row:06d}"

    def _publish(self, index: int, row: dict[str, Any]) -> None:
        for outbox in self.outboxes:
            outbox.put(inspection_message(self.message_id(index), row, self.judge.category))

    def recover(self, log: RowLog) -> None:
        """Rows written just before a stop whose input has no ledger line (or message) yet get them now, so
        that their input is not scored again and their verdict not left unpublished."""
        recorded = {(entry["path"], entry.get("taken")) for entry in self.ledger.entries}
        queued = [{message["id"] for message in outbox.messages} for outbox in self.outboxes]
        for index, row in enumerate(log.rows):
            for outbox, ids in zip(self.outboxes, queued, strict=True):
                if self.message_id(index) not in ids:
                    outbox.put(inspection_message(self.message_id(index), row, self.judge.category))
            if (row["path"], row.get("timestamp")) not in recorded:
                self.ledger.record({**self.feed.recovered_entry(row), "taken": row.get("timestamp"),
                                    "outcome": "scored", "row": index, "decision": row.get("decision")})

    def score(self, items: list[FeedItem], log: RowLog) -> None:
        """Inspect ``items`` as one batch; each gets its row (or its reason) and ledger line, then goes back
        to the feed."""
        outcomes = self.judge.inspect(items, self.stop)
        for item, outcome in zip(items, outcomes, strict=True):
            entry: dict[str, Any] = {**item.entry,
                                     "taken": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
            if isinstance(outcome, tuple):
                logger.warning("skipped %s: %s", *outcome)
                entry.update(outcome="failed", reason=outcome[1])
                self.failed += 1
            else:
                start = time.perf_counter()
                row = self.writer.write(f"{len(log.rows):06d}_{item.name}", outcome)
                height, width = item.decoded.image.shape[:2] if item.decoded.image is not None else (None, None)
                row = {**row, **item.fields, "width": width, "height": height,
                       "seconds": round(outcome.seconds + time.perf_counter() - start, 4), "timestamp": entry["taken"]}
                log.append(row)
                self._publish(len(log.rows) - 1, row)
                self._observe_drift(row["score"])
                entry.update(outcome="scored", row=len(log.rows) - 1, decision=row["decision"])
                self.scored += 1
            self.ledger.record(entry)
            self.feed.settle(item, entry["outcome"])

    def _observe_drift(self, score: float | None) -> None:
        monitor = self.judge.drift
        if monitor is None or score is None or monitor.observe(score) is None:
            return
        state = monitor.state()
        if state.state == ALARM:
            logger.warning("score-drift alarm (%d bad windows in a row): %s; check the camera and light, then "
                           "`clipfusion doctor` and `clipfusion calibrate`", state.bad_in_a_row, state.detail)
        else:
            logger.info("score drift: %s after %d images (%s)", state.state, state.images, state.detail)

    def run(self, on_batch: Callable[[int], None] | None = None) -> int:
        """Watch until ``stop`` is set or the feed ends; the images scored (or failed) this time."""
        with RowLog(self.out, (*ROW_FIELDS, "width", "height", *self.feed.row_fields)) as log:
            self.recover(log)
            for outbox in self.outboxes:
                outbox.start()
            self.feed.start(self.ledger)
            taken = 0
            try:
                while not self.stop.is_set():
                    items = self.feed.take(self.batch_size, self.stop)
                    if items:
                        try:
                            self.score(items, log)
                        except Stopped:  # stopped while the service did not answer: taken again next time
                            break
                        taken += len(items)
                        if on_batch is not None:
                            on_batch(len(items))
                    elif self.feed.ended:
                        break
            finally:  # what the sinks take in a few seconds is delivered; the rest waits in the outboxes
                self.feed.close()
                for outbox in self.outboxes:
                    outbox.close()
        return taken
