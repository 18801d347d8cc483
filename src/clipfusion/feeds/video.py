"""Video files, live streams and cameras, decoded with PyAV (FFmpeg's libraries).

A **file** gives every frame (or every ``every``-th, or ``fps`` per second of its own time), in order,
waiting for the scorer (nothing dropped); the ledger records each frame scored, so a restart resumes after
the last one.  A **live source** (``rtsp://``, ``http(s)://``, ``udp://``..., or a local camera
``/dev/videoN``) is read by a thread that keeps only the newest ``queue`` frames (the oldest is dropped:
a verdict on a frame seconds old is worth little on a line), with open and read timeouts: a stream that
stops sending, fails or ends is opened again with backoff, said in the log; a picture that stops changing
for ``frozen_after`` seconds (a hung encoder still sending its last frame) raises the frozen-stream alarm.
A ``trigger`` (a file that appears, or an MQTT message) takes the next frame instead of a rate.
Each row names the source (without its password), the frame's index and its time in the stream.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipfusion.data.base import MAX_PIXELS
from clipfusion.errors import ClipfusionError
from clipfusion.feeds.base import FeedItem, Ledger
from clipfusion.inspection.sources import read_source

logger = logging.getLogger(__name__)
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".ts", ".mpg", ".mpeg", ".mjpeg", ".h264",
                    ".h265", ".hevc")
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)  # seconds before opening a lost stream again
FROZEN_STRIDE = 8  # pixels between the samples compared to tell a frozen picture


def is_live(source: str) -> bool:
    """A stream or camera (as opposed to a file that has an end)."""
    return urllib.parse.urlsplit(source).scheme in LIVE_SCHEMES or source.startswith("/dev/video")


def is_video(source: str) -> bool:
    """Whether ``watch SOURCE`` reads a video (a stream, a camera or a video file) rather than a folder."""
    return is_live(source) or source.lower().endswith(VIDEO_EXTENSIONS)


def without_password(source: str) -> str:
    """``source`` as rows and logs name it: a URL's password replaced by ``***``."""
    parts = urllib.parse.urlsplit(source)
    if parts.password is None:
        return source
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def with_credentials(source: str) -> str:
    """A stream URL with ``CLIPFUSION_STREAM_USERNAME``/``_PASSWORD`` from the environment (never on the
    command line, where every user of the machine sees it) when it names none itself."""
    parts = urllib.parse.urlsplit(source)
    username, password = os.environ.get("CLIPFUSION_STREAM_USERNAME"), os.environ.get("CLIPFUSION_STREAM_PASSWORD")
    if parts.scheme not in LIVE_SCHEMES or parts.username or not username:
        return source
    user = urllib.parse.quote(username, safe="") + (":" + urllib.parse.quote(password, safe="") if password else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc}"))


class Trigger(Protocol):
    def fired(self) -> bool:
        """Whether a frame is asked for (consumes the request)."""

    def close(self) -> None: ...


class FileTrigger:
    """A frame is taken each time ``path`` appears (the file is then removed): what a PLC gateway that
    writes files can do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fired(self) -> bool:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        pass


class MqttTrigger:
    """A frame is taken for each message on an MQTT topic (``mqtt://HOST[:PORT]/TOPIC``)."""

    def __init__(self, url: str) -> None:
        from clipfusion.publishing.mqtt import broker_client

        self.pending, self.lock = 0, threading.Lock()
        broker = broker_client(url, f"clipfusion-trigger-{os.getpid()}", "--trigger")
        self.client = broker.client
        # subscribed again on every connection: a broker restarted meanwhile still delivers the triggers
        self.client.on_connect = lambda client, *_: client.subscribe(broker.topic, qos=1)
        self.client.on_message = self._received
        self.client.connect_async(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _received(self, *_: Any) -> None:
        with self.lock:
            self.pending += 1

    def fired(self) -> bool:
        with self.lock:
            if self.pending == 0:
                return False
            self.pending -= 1
            return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True)
class Sampling:
    """Which frames are scored: every ``every``-th; or ``fps`` per second of stream time; or, with a
    ``trigger``, the next frame after each request."""

    every: int = 1
    fps: float | None = None
    trigger: Trigger | None = None

    def __post_init__(self) -> None:
        if self.every < 1 or (self.fps is not None and self.fps <= 0):
            raise ClipfusionError("--every must be >= 1 and --fps > 0")
        if sum((self.every != 1, self.fps is not None, self.trigger is not None)) > 1:
            raise ClipfusionError("give one of --every, --fps and --trigger")


@dataclass
class Frame:
    """A decoded frame waiting to be scored: its index in the source (for a live source: since the watch
    began, across reconnections), its time in the stream (seconds, None if unknown), (H, W, 3) uint8 pixels."""

    index: int
    time: float | None
    image: np.ndarray = field(repr=False)


class FrameBuffer:
    """Frames between the reading thread and the scorer: for a live source the newest ``capacity`` (the
    oldest dropped and counted), for a file every frame (the reader waits for room)."""

    def __init__(self, capacity: int, drop_oldest: bool) -> None:
        self.frames: collections.deque[Frame] = collections.deque()
        self.capacity, self.drop_oldest = capacity, drop_oldest
        self.dropped, self.closed = 0, False
        self.changed = threading.Condition()

    def put(self, frame: Frame, stop: threading.Event) -> None:
        with self.changed:
            if self.drop_oldest:
                while len(self.frames) >= self.capacity:
                    self.frames.popleft()
                    self.dropped += 1
            else:
                while len(self.frames) >= self.capacity and not stop.is_set():
                    self.changed.wait(0.1)
            self.frames.append(frame)
            self.changed.notify_all()

    def get(self, limit: int, wait: float) -> list[Frame]:
        """Up to ``limit`` frames, waiting up to ``wait`` seconds for the first."""
        with self.changed:
            if not self.frames and not self.closed:
                self.changed.wait(wait)
            taken = [self.frames.popleft() for _ in range(min(limit, len(self.frames)))]
            self.changed.notify_all()
            return taken

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    @property
    def drained(self) -> bool:
        with self.changed:
            return self.closed and not self.frames


class VideoFeed:
    """Frames of ``source`` (a video file, a stream URL or ``/dev/videoN``).  sampling: which frames;
    queue: frames kept for a live source; open_timeout / read_timeout: seconds before a connection or a
    silent stream is given up (and opened again); frozen_after: seconds of an unchanging picture before the
    alarm; once: a live source is not opened again when it ends; max_pixels: larger frames are refused."""

    row_fields: tuple[str, ...] = ("frame", "frame_time")

    def __init__(self, source: str, sampling: Sampling | None = None, queue: int = 4, open_timeout: float = 10.0,
                 read_timeout: float = 5.0, frozen_after: float = 10.0, once: bool = False,
                 max_pixels: int = MAX_PIXELS) -> None:
        try:
            import av  # noqa: F401  (the reading thread decodes with it)
        except ImportError:
            raise ClipfusionError("watch reads video with PyAV: pip install 'clipfusion[line]'") from None
        self.live = is_live(source)
        if not self.live and not Path(source).is_file():
            raise ClipfusionError(f"watch: {source} is not a file; give a video file, a stream URL or a folder")
        self.sampling = sampling or Sampling()
        if self.sampling.trigger is not None and not self.live:
            raise ClipfusionError("--trigger takes frames of a live stream or camera; a video file gives every frame "
                                  "(or --every N / --fps)")
        if queue < 1 or open_timeout <= 0 or read_timeout <= 0 or frozen_after <= 0:
            raise ClipfusionError("--queue must be >= 1; --open-timeout, --read-timeout and --frozen-after > 0")
        self.source = source if self.live else os.path.abspath(source)
        self.description = without_password(self.source)
        self.queue, self.open_timeout, self.read_timeout = queue, open_timeout, read_timeout
        self.frozen_after, self.once, self.max_pixels = frozen_after, once, max_pixels
        self.buffer = FrameBuffer(queue if self.live else 2 * queue, drop_oldest=self.live)
        self.resume_after = -1  # a file: the last frame scored by an earlier run
        self.frames_read, self.reconnects, self.frozen_alarms, self.frozen = 0, 0, 0, False
        self._last_slot: int | None = None
        self._still_since: float | None = None
        self._previous: np.ndarray | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="video-reader", daemon=True)

    @property
    def ended(self) -> bool:
        return self.buffer.drained

    def start(self, ledger: Ledger) -> None:
        if not self.live:
            done = [entry["frame"] for entry in ledger.entries if entry.get("path") == self.description]
            self.resume_after = max(done, default=-1)
            if done:
                logger.info("%s: frames up to %d were scored before: going on from there", self.description,
                            self.resume_after)
        self._thread.start()

    def _wanted(self, index: int, seconds: float | None) -> bool:
        """Whether frame ``index`` (at ``seconds`` in the stream) is sampled."""
        sampling = self.sampling
        if sampling.trigger is not None:
            return sampling.trigger.fired()
        if sampling.fps is not None:
            slot = int((seconds if seconds is not None else time.monotonic()) * sampling.fps)
            if slot == self._last_slot:
                return False
            self._last_slot = slot
            return True
        return index % sampling.every == 0

    def _watch_picture(self, frame: Any) -> None:
        """The frozen-stream alarm: raised once the picture has not changed for ``frozen_after`` seconds.
        Every decoded frame is compared (sampled, in its first plane as decoded: no colour conversion), the
        ones not scored too: a trigger may take one frame a minute."""
        plane = frame.planes[0]
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
        sample = rows[::FROZEN_STRIDE, :plane.width:FROZEN_STRIDE].copy()
        now = time.monotonic()
        if self._previous is not None and self._previous.shape == sample.shape and np.array_equal(sample,
                                                                                                   self._previous):
            self._still_since = self._still_since or now
            if not self.frozen and now - self._still_since >= self.frozen_after:
                self.frozen, self.frozen_alarms = True, self.frozen_alarms + 1
                logger.error("%s looks frozen: the picture has not changed for %.0f s (camera or encoder hung?)",
                             self.description, now - self._still_since)
        else:
            if self.frozen:
                logger.warning("%s: the picture moves again", self.description)
            self._still_since, self.frozen = None, False
        self._previous = sample

    def _read(self) -> None:
        """The reading thread: open, decode, sample, buffer; for a live source, again after each loss."""
        import av

        failures = 0
        index = 0  # a live source counts frames across reconnections
        try:
            while not self._stop.is_set():
                device = "v4l2" if self.source.startswith("/dev/video") else None
                try:
                    with av.open(with_credentials(self.source), format=device,
                                 timeout=(self.open_timeout, self.read_timeout)) as container:
                        stream = container.streams.video[0]
                        stream.thread_type = "AUTO"
                        if failures:
                            logger.warning("%s: connected again", self.description)
                        failures = 0
                        if not self.live:
                            index = 0
                        for frame in container.decode(stream):
                            if self._stop.is_set():
                                return
                            self.frames_read += 1
                            current, index = index, index + 1
                            if self.live:
                                self._watch_picture(frame)
                            if current <= self.resume_after or not self._wanted(current, frame.time):
                                continue
                            self.buffer.put(Frame(current, frame.time, frame.to_ndarray(format="rgb24")), self._stop)
                    reason = "ended"
                except (av.FFmpegError, OSError, IndexError) as exc:  # refused, timed out, cut, no video stream
                    reason = str(exc) if not isinstance(exc, av.ExitError) else \
                        f"no data for {self.read_timeout:g} s"
                    if not self.live:
                        logger.error("%s could not be read to the end: %s", self.description, reason)
                if not self.live or self.once or self._stop.is_set():
                    return
                delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
                logger.warning("%s %s: opening it again in %g s", self.description, reason, delay)
                failures, self.reconnects = failures + 1, self.reconnects + 1
                self._stop.wait(delay)
        finally:
            self.buffer.close()

    def take(self, limit: int, stop: threading.Event) -> list[FeedItem]:
        items = []
        for frame in self.buffer.get(limit, 0.2):
            stamp = None if frame.time is None else round(frame.time, 4)
            decoded = read_source(frame.image, self.max_pixels, self.description)
            items.append(FeedItem(decoded, f"{Path(urllib.parse.urlsplit(self.description).path).stem}"
                                           f"-f{frame.index:07d}",
                                  fields={"frame": frame.index, "frame_time": stamp},
                                  entry={"path": self.description, "frame": frame.index}))
        return items

    def settle(self, item: FeedItem, outcome: str) -> None:
        pass  # a frame has nothing to move

    def recovered_entry(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"path": row["path"], "frame": row.get("frame", -1)}

    def counters(self) -> dict[str, float]:
        return {"frames_read_total": self.frames_read, "frames_dropped_total": self.buffer.dropped,
                "reconnects_total": self.reconnects, "frozen_alarms_total": self.frozen_alarms,
                "frozen": float(self.frozen), "frames_waiting": len(self.buffer.frames)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.read_timeout + 5)
        if self.sampling.trigger is not None:
            self.sampling.trigger.close()
