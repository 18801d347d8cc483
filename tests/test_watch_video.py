"""``clipfusion watch`` on video: a file written here (lossless, so the detector's scores of its pictures
are the reference), resumed after a stop without a frame scored twice; a live HTTP stream served by
Debian's ffmpeg, cut and served again (the watch reconnects and says so in its log and metrics); a dead
and a silent RTSP address (timeouts and retries, never a hang); and, in-process, the live source's
newest-frame queue, a trigger and the frozen-picture alarm."""
from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from clipfusion.feeds.base import Ledger
from clipfusion.feeds.video import FileTrigger, Sampling, VideoFeed
from clipfusion.images import to_rgb
from clipfusion.methods.clipfusion.detector import CLIPFusion

from .commands import rows_so_far, wait_for
from .servers import Stream, free_port, start_stream

FRAME_RATE = 5


def write_video(path: Path, frames: list[np.ndarray], rate: int = FRAME_RATE) -> None:
    """A lossless video (FFV1): decoded, its frames are exactly ``frames``."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _watch(source: str, out: Path, model: Path, log: Path, *extra: str) -> subprocess.Popen:
    script = Path(sys.executable).with_name("clipfusion")
    with log.open("ab") as sink:
        return subprocess.Popen([str(script), "watch", source, "--model", str(model), "--out", str(out), *extra],
                                stdout=sink, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def pictures(synthetic_root: Path) -> list[np.ndarray]:
    """The synthetic test images of 'disc', good and defective, as frames."""
    return [to_rgb(path) for path in sorted((synthetic_root / "disc" / "test").rglob("*.png"))]


def test_a_video_file_is_scored_frame_by_frame_and_resumed_after_a_stop(model, pictures, tmp_path):
    frames = (pictures * 4)[:30]
    video, out = tmp_path / "shift.avi", tmp_path / "results"
    write_video(video, frames)
    log = tmp_path / "watch.log"
    watcher = _watch(str(video), out, model, log, "--batch-size", "2")
    try:
        wait_for(lambda: len(rows_so_far(out)) >= 4)
        watcher.send_signal(signal.SIGTERM)  # stopped mid-file: the batch under way is finished and recorded
        assert watcher.wait(timeout=60) == 0, log.read_text()
    finally:
        if watcher.poll() is None:
            watcher.kill()
    first = len(rows_so_far(out))
    assert first < len(frames), "the stop came after the end: nothing to resume"
    again = subprocess.run([str(Path(sys.executable).with_name("clipfusion")), "watch", str(video), "--model",
                            str(model), "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = rows_so_far(out)
    assert [row["frame"] for row in rows] == list(range(len(frames)))  # each frame once, in order, none twice
    assert all(row["path"] == str(video) for row in rows)
    assert [row["frame_time"] for row in rows] == pytest.approx([index / FRAME_RATE for index in range(len(frames))])
    expected = CLIPFusion.load(model).predict(frames, "disc").scores
    assert [row["score"] for row in rows] == pytest.approx([float(score) for score in expected], abs=1e-5)
    # a video keeps the pictures of its NG frames (default --pictures ng); every NG frame its mask
    decisions = [row["decision"] for row in rows]
    assert "OK" in decisions and "NG" in decisions
    for row in rows:
        kept = [row[name] for name in ("overlay", "thumbnail", "map")]
        assert all((out / name).is_file() for name in kept) if row["decision"] == "NG" else kept == [None] * 3
        assert (row["mask"] is not None) == (row["decision"] == "NG")


def test_every_nth_frame_of_a_video(model, pictures, tmp_path):
    video, out = tmp_path / "shift.avi", tmp_path / "results"
    write_video(video, pictures[:7])
    done = subprocess.run([str(Path(sys.executable).with_name("clipfusion")), "watch", str(video), "--model",
                           str(model), "--out", str(out), "--every", "3", "--quiet"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert [row["frame"] for row in rows_so_far(out)] == [0, 3, 6]
    refused = subprocess.run([str(Path(sys.executable).with_name("clipfusion")), "watch", str(video), "--model",
                              str(model), "--out", str(out), "--after", "move"], capture_output=True, text=True)
    assert refused.returncode == 2 and "a video is left as it is" in refused.stderr


def _metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


def test_a_live_stream_cut_and_served_again_is_reconnected(model, pictures, tmp_path):
    video = tmp_path / "camera.avi"
    write_video(video, pictures, rate=10)
    serve = ["-stream_loop", "-1", "-i", str(video), "-c:v", "mpeg2video", "-q:v", "2"]
    stream = start_stream(serve)
    out, log, metrics = tmp_path / "results", tmp_path / "watch.log", free_port()
    watcher = _watch(stream.url, out, model, log, "--fps", "2", "--read-timeout", "2", "--metrics-port", str(metrics))
    try:
        wait_for(lambda: len(rows_so_far(out)) >= 2)
        stream.stop()  # the camera goes away
        wait_for(lambda: "opening it again" in log.read_text(), 30)
        cut = len(rows_so_far(out))
        stream = Stream(serve, stream.port, "mpegts").start()  # back, on the same address
        wait_for(lambda: len(rows_so_far(out)) >= cut + 2, 60)
        assert _metric(metrics, "clipfusion_watch_reconnects_total") >= 1
        assert _metric(metrics, "clipfusion_watch_images_scored_total") >= cut + 2
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=60) == 0, log.read_text()
    finally:
        stream.stop()
        if watcher.poll() is None:
            watcher.kill()
    rows = rows_so_far(out)
    frames = [row["frame"] for row in rows]
    assert frames == sorted(set(frames)) and all(row["path"] == stream.url for row in rows)
    assert all(row["decision"] in ("OK", "NG") for row in rows)


def test_a_dead_or_silent_rtsp_address_is_retried_and_never_hangs(model, tmp_path):
    silent = socket.socket()  # accepts connections and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    dead = free_port()
    logs = [tmp_path / "dead.log", tmp_path / "silent.log"]
    watchers = [_watch(f"rtsp://127.0.0.1:{port}/stream1", tmp_path / f"out-{port}", model, log, "--open-timeout", "1")
                for port, log in zip((dead, silent.getsockname()[1]), logs, strict=True)]
    try:
        wait_for(lambda: all(log.read_text().count("opening it again") >= 2 for log in logs), 60)
        for watcher in watchers:
            watcher.send_signal(signal.SIGTERM)
        assert [watcher.wait(timeout=20) for watcher in watchers] == [0, 0]
    finally:
        silent.close()
        for watcher in watchers:
            if watcher.poll() is None:
                watcher.kill()
    assert "Connection refused" in logs[0].read_text()
    assert "rtsp://127.0.0.1" in logs[1].read_text() and "Traceback" not in logs[1].read_text()


def test_a_live_source_keeps_the_newest_frames_and_takes_a_frame_per_trigger(pictures, tmp_path, caplog):
    moving = start_stream(["-f", "lavfi", "-i", "testsrc=size=96x96:rate=25", "-c:v", "mpeg2video"])
    feed = VideoFeed(moving.url, queue=2, read_timeout=3)
    feed.start(Ledger(tmp_path / "moving.jsonl"))
    try:
        time.sleep(2.0)  # nobody takes frames: the queue keeps the newest two
        taken = feed.take(10, threading.Event())
        assert len(taken) == 2 and feed.buffer.dropped >= 10
        assert taken[1].fields["frame"] == taken[0].fields["frame"] + 1 >= 10  # the newest, in order
    finally:
        feed.close()
        moving.stop()

    # a camera whose picture stops changing (an MJPEG stream of one still image), sampled by a trigger file
    still = tmp_path / "still.png"
    from PIL import Image

    Image.fromarray(pictures[0]).save(still)
    frozen = start_stream(["-loop", "1", "-framerate", "10", "-i", str(still), "-c:v", "mjpeg", "-q:v", "3"],
                          container="mpjpeg")
    trigger = tmp_path / "take-one"
    feed = VideoFeed(frozen.url, Sampling(trigger=FileTrigger(trigger)), frozen_after=1.0, read_timeout=3)
    feed.start(Ledger(tmp_path / "still.jsonl"))
    stop = threading.Event()
    caplog.set_level(logging.WARNING, logger="clipfusion.feeds.video")
    try:
        got: list = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            got += feed.take(10, stop)
        assert got == []  # no trigger, no frame
        for _ in range(2):
            trigger.touch()
            wait_for(lambda: not trigger.exists(), 10)
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                got += feed.take(10, stop)
        assert len(got) == 2 and got[1].fields["frame"] > got[0].fields["frame"]
        assert np.abs(got[0].decoded.image.astype(int) - pictures[0]).mean() < 3  # the picture, through JPEG
        wait_for(lambda: feed.frozen, 10)
        assert feed.frozen_alarms == 1 and any("looks frozen" in record.message for record in caplog.records)
    finally:
        feed.close()
        frozen.stop()
