"""``clipfusion watch`` on a hot folder, as a real process: complete files are scored once with the
model's own verdict, a half-copied file only when complete, an unreadable one set aside, hidden files
ignored; a restart scores what arrived while it was down and nothing twice; a burst of files is taken
whole."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clipfusion.methods.clipfusion.detector import CLIPFusion

from .commands import clipfusion_here, rows_so_far, wait_for
from .servers import Subscriber, start_broker


def _start(folder: Path, out: Path, model: Path, *extra: str) -> subprocess.Popen:
    script = Path(sys.executable).with_name("clipfusion")
    return subprocess.Popen([str(script), "watch", str(folder), "--model", str(model), "--out", str(out), "--settle",
                             "0.6", "--poll", "0.1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_hot_folder_is_scored_once_per_complete_file_across_a_restart(model, synthetic_root, tmp_path):
    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))
    folder, out = tmp_path / "incoming", tmp_path / "results"
    folder.mkdir()
    watcher = _start(folder, out, model, "--after", "move")
    try:
        shutil.copy(images[0], tmp_path / "staged.png")
        (tmp_path / "staged.png").rename(folder / "renamed-in.png")  # a file renamed into the folder
        data = images[1].read_bytes()
        with (folder / "half-copied.png").open("wb") as partial:  # a copy that stalls half-way
            partial.write(data[:len(data) // 2])
            partial.flush()
            time.sleep(0.3)  # under --settle: not taken yet
            partial.write(data[len(data) // 2:])
        (folder / "broken.png").write_bytes(b"not an image")
        (folder / ".upload-in-progress.png").write_bytes(data[:100])  # hidden: never taken
        wait_for(lambda: len(rows_so_far(out)) == 2 and (folder / "failed" / "broken.png").exists())
        assert watcher.poll() is None
        watcher.send_signal(signal.SIGTERM)  # finishes the batch under way, then stops
        assert watcher.wait(timeout=60) == 0, watcher.stderr.read() if watcher.stderr else ""
    finally:
        if watcher.poll() is None:
            watcher.kill()
    rows = {Path(row["path"]).name: row for row in rows_so_far(out)}
    assert sorted(rows) == ["half-copied.png", "renamed-in.png"]
    expected = CLIPFusion.load(model).predict([images[0], images[1]], "disc").scores
    assert rows["renamed-in.png"]["score"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert rows["half-copied.png"]["score"] == pytest.approx(float(expected[1]), abs=1e-5)  # the whole file
    assert sorted(p.name for p in (folder / "done").iterdir()) == ["half-copied.png", "renamed-in.png"]
    assert (folder / ".upload-in-progress.png").exists() and all((out / row["overlay"]).is_file()
                                                                 for row in rows.values())

    # while it is down, a burst arrives; a restart takes each of them once, and none of the earlier ones
    for number, image in enumerate(images[2:] * 3):
        shutil.copy(image, folder / f"burst-{number:02d}.png")
    burst = len(images[2:]) * 3
    again = clipfusion_here("watch", str(folder), "--model", str(model), "--out", str(out), "--settle", "0.2",
                            "--poll", "0.1", "--after", "move", "--once", "--quiet")
    assert again.returncode == 0, again.stderr
    names = [Path(row["path"]).name for row in rows_so_far(out)]
    assert len(names) == len(set(names)) == 2 + burst
    ledger = [json.loads(line) for line in (out / "watch.jsonl").read_text().splitlines()]
    assert sorted(entry["outcome"] for entry in ledger) == ["failed"] + ["scored"] * (2 + burst)
    assert not list(folder.glob("burst-*.png"))  # all moved to done/


def test_watch_refuses_an_output_inside_the_folder_in_one_line(model, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    refused = clipfusion_here("watch", str(folder), "--model", str(model), "--out", str(folder / "results"))
    assert refused.returncode == 2 and "inside the watched folder" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    export = tmp_path / "export"  # a folder given as the model: an export, which PyTorch options cannot reach
    export.mkdir()
    ignored = clipfusion_here("watch", str(folder), "--model", str(export), "--compile", "--out", str(tmp_path / "o"))
    assert ignored.returncode == 2 and "drop --compile" in ignored.stderr and not (tmp_path / "o").exists()


def test_files_left_in_place_are_not_scored_again_unless_they_change(model, synthetic_root, tmp_path):
    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))
    folder, out = tmp_path / "incoming", tmp_path / "results"
    folder.mkdir()
    names = [f"{number}-{image.name}" for number, image in enumerate(images[:2])]  # the test images share names
    for name, image in zip(names, images, strict=False):
        shutil.copy(image, folder / name)

    def once() -> list[str]:
        done = clipfusion_here("watch", str(folder), "--model", str(model), "--out", str(out), "--settle", "0.2",
                               "--poll", "0.1", "--once", "--quiet")
        assert done.returncode == 0, done.stderr
        return [Path(row["path"]).name for row in rows_so_far(out)]

    assert sorted(once()) == sorted(names)
    assert len(once()) == 2  # kept in place, taken already: nothing scored again
    shutil.copy(images[3], folder / names[0])  # the camera writes a new image under a used name
    assert once().count(names[0]) == 2


def test_verdicts_reach_mqtt_in_order_and_none_is_lost_while_the_broker_is_down(model, synthetic_root, tmp_path):
    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[:6]
    folder, out = tmp_path / "incoming", tmp_path / "results"
    folder.mkdir()
    broker = start_broker(tmp_path / "broker")
    subscriber = Subscriber(broker.port, "line/verdicts")
    watcher = _start(folder, out, model, "--after", "move", "--publish",
                     f"mqtt://127.0.0.1:{broker.port}/line/verdicts")
    try:
        for number, image in enumerate(images[:3]):
            shutil.copy(image, folder / f"{number}-{image.name}")  # the test images share names
        wait_for(lambda: len(subscriber.ids()) == 3)
        broker.stop()  # the broker goes away; the line does not stop
        for number, image in enumerate(images[3:], 3):
            shutil.copy(image, folder / f"{number}-{image.name}")
        wait_for(lambda: len(rows_so_far(out)) == 6)
        assert len(subscriber.ids()) == 3 and next(out.glob("outbox-mqtt-*.delivered")).read_text() == "3"
        broker.start()  # back on the same port, with its sessions: the outbox delivers the rest
        wait_for(lambda: len(subscriber.ids()) == 6)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=60) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
        subscriber.close()
        broker.stop()
    run_id = json.loads((out / "watch.json").read_text())["run_id"]
    assert subscriber.ids() == [f"{run_id}-{row:06d}" for row in range(6)]  # every verdict, in order
    first = {message["id"]: message for message in reversed(subscriber.messages)}
    for row, expected in enumerate(rows_so_far(out)):
        message = first[f"{run_id}-{row:06d}"]
        assert message["schema"] == "clipfusion.inspection/1" and message["source"] == expected["path"]
        assert (message["decision"], message["score"]) == (expected["decision"], expected["score"])
    assert next(out.glob("outbox-mqtt-*.delivered")).read_text() == "6"


def test_verdicts_reach_a_webhook_signed_in_order_after_it_refused_them(model, synthetic_root, tmp_path):
    """A receiver on loopback that answers 503 three times, then 200: every verdict arrives, in order,
    each with a valid HMAC-SHA256 signature (checked here with the secret) and its id as Idempotency-Key."""
    import hashlib
    import hmac
    import os
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    accepted: list[tuple[dict, bool, str]] = []  # message, signature valid, Idempotency-Key
    refusals = [3]

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = 503 if refusals[0] > 0 else 200
            refusals[0] -= 1
            if status == 200:
                expected = "sha256=" + hmac.new(b"line-3-secret", body, hashlib.sha256).hexdigest()
                valid = hmac.compare_digest(expected, self.headers["X-Clipfusion-Signature"])
                accepted.append((json.loads(body), valid, self.headers["Idempotency-Key"]))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[:4]
    folder, out = tmp_path / "incoming", tmp_path / "results"
    folder.mkdir()
    os.environ["CLIPFUSION_WEBHOOK_SECRET"] = "line-3-secret"  # the watch process inherits it
    try:
        watcher = _start(folder, out, model, "--publish", f"http://127.0.0.1:{receiver.server_port}/hook")
        for number, image in enumerate(images):
            shutil.copy(image, folder / f"{number}-{image.name}")
        wait_for(lambda: len({message["id"] for message, _, _ in accepted}) == 4)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=60) == 0
    finally:
        del os.environ["CLIPFUSION_WEBHOOK_SECRET"]
        receiver.shutdown()
    run_id = json.loads((out / "watch.json").read_text())["run_id"]
    ids = list(dict.fromkeys(message["id"] for message, _, _ in accepted))
    assert ids == [f"{run_id}-{row:06d}" for row in range(4)]
    assert all(valid and key == message["id"] for message, valid, key in accepted)
    first = {message["id"]: message for message, _, _ in reversed(accepted)}
    assert [first[identifier]["decision"] for identifier in ids] == [row["decision"] for row in rows_so_far(out)]


def test_a_thousand_files_at_once_killed_mid_burst_each_scored_once_and_published(model, synthetic_root, tmp_path):
    """1,000 files dropped at once, publishing to MQTT; the watch is killed (SIGKILL: no clean-up at all)
    mid-burst and started again: every file scored exactly once, every verdict delivered, a message sent
    twice only with the same id."""
    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))
    folder, out = tmp_path / "incoming", tmp_path / "results"
    folder.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    for number in range(1000):
        shutil.copy(images[number % len(images)], staging / f"part-{number:04d}.png")
    broker = start_broker(tmp_path / "broker")
    subscriber = Subscriber(broker.port, "line/burst")
    publish = ("--publish", f"mqtt://127.0.0.1:{broker.port}/line/burst", "--batch-size", "16", "--after", "move")
    watcher = _start(folder, out, model, *publish)
    again: subprocess.Popen | None = None
    try:
        for path in sorted(staging.iterdir()):
            path.rename(folder / path.name)  # all at once (renames are atomic: complete files)
        wait_for(lambda: len(rows_so_far(out)) >= 300, 300)
        watcher.send_signal(signal.SIGKILL)
        watcher.wait(timeout=30)
        again = _start(folder, out, model, *publish)
        wait_for(lambda: len(rows_so_far(out)) >= 1000 and len(subscriber.ids()) >= 1000, 600)
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0
    finally:
        for process in (watcher, again):
            if process is not None and process.poll() is None:
                process.kill()
        subscriber.close()
        broker.stop()
    rows = rows_so_far(out)
    names = [Path(row["path"]).name for row in rows]
    assert len(rows) == 1000 and sorted(names) == [f"part-{number:04d}.png" for number in range(1000)]
    run_id = json.loads((out / "watch.json").read_text())["run_id"]
    assert sorted(subscriber.ids()) == [f"{run_id}-{row:06d}" for row in range(1000)]
    first = {}
    for message in subscriber.messages:  # a message received twice is the same verdict
        assert first.setdefault(message["id"], message) == message
    assert [first[f"{run_id}-{row:06d}"]["source"] for row in range(1000)] == [row["path"] for row in rows]
    assert len(list((folder / "done").iterdir())) == 1000 and not list(folder.glob("*.png"))


def test_file_system_events_wake_the_watch_and_a_dead_observer_is_started_again(synthetic_root, tmp_path, caplog):
    """With a 30-s poll, a file is taken within seconds: the observer's event woke the look.  The observer
    stopped (as when a share is unmounted) is started again, said in the log, and wakes the watch again."""
    import logging

    from clipfusion.feeds.base import Ledger
    from clipfusion.feeds.folder import FolderFeed

    image = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[0]
    folder = tmp_path / "incoming"
    folder.mkdir()
    feed = FolderFeed(folder, settle=0.2, poll=30)
    feed.start(Ledger(tmp_path / "watch.jsonl"))
    stop = threading.Event()
    caplog.set_level(logging.WARNING, logger="clipfusion.feeds.folder")

    def taken_after_drop(name: str) -> float:
        threading.Timer(0.3, shutil.copy, (image, folder / name)).start()
        start = time.monotonic()
        while True:
            items = feed.take(8, stop)
            if items:
                assert [Path(item.entry["path"]).name for item in items] == [name]
                for item in items:
                    feed.settle(item, "scored")
                return time.monotonic() - start
            assert time.monotonic() - start < 60

    try:
        assert feed.events and taken_after_drop("first.png") < 5
        feed._observer.stop()  # the observer dies
        feed._observer.join()
        assert taken_after_drop("second.png") < 5
        assert feed.counters()["observer_restarts_total"] == 1
        assert any("starting it again" in record.message for record in caplog.records)
    finally:
        feed.close()
