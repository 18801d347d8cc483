"""``watch --server``: images scored by a running ``clipfusion serve`` (one copy of the model), the rows
equal to the service's own inspections and to the detector run here; the service stopped mid-run and
started again (the images wait, none lost, none inspected twice); Idempotency-Key on the service."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clipfusion.methods.clipfusion.detector import CLIPFusion

from .commands import rows_so_far, wait_for
from .conftest import API_KEY
from .servers import start_server

KEY = {"X-API-Key": API_KEY}


def test_a_retried_request_with_its_idempotency_key_gets_the_same_inspections(service, synthetic_root):
    paths = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[:2]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    before = httpx.get(f"{service.url}/v1/inspections", params={"limit": 1}, headers=KEY).json()["total"]
    key = {"Idempotency-Key": f"retry-test-{time.time_ns()}", **KEY}
    answers = [httpx.post(f"{service.url}/v1/models/disc/inspect", files=files, headers=key, timeout=120)
               for _ in range(2)]
    assert [answer.status_code for answer in answers] == [200, 200]
    first, second = ([i["id"] for i in answer.json()["inspections"]] for answer in answers)
    assert first == second and len(first) == 2  # the same two inspections, in the request's order
    assert httpx.get(f"{service.url}/v1/inspections", params={"limit": 1}, headers=KEY).json()["total"] == before + 2
    too_long = httpx.post(f"{service.url}/v1/models/disc/inspect", files=files, timeout=60,
                          headers={"Idempotency-Key": "k" * 181, **KEY})
    assert too_long.status_code == 400 and too_long.json()["code"] == "bad_request"


def test_watch_through_a_running_service_loses_nothing_while_it_restarts(model, synthetic_root, tmp_path):
    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[:5]
    served = tmp_path / "disc.cfm"
    served.write_bytes(model.read_bytes())
    (tmp_path / "keys.txt").write_text(f"station-1 operator {API_KEY}\n")
    keys = ["--api-key-file", str(tmp_path / "keys.txt")]
    server = start_server([served], tmp_path / "data", *keys)
    port = int(server.url.rsplit(":", 1)[1])
    folder, out, log = tmp_path / "incoming", tmp_path / "results", tmp_path / "watch.log"
    folder.mkdir()
    script = Path(sys.executable).with_name("clipfusion")
    environment = {**os.environ, "CLIPFUSION_API_KEY": API_KEY}  # the key never on the command line
    with log.open("ab") as sink:
        watcher = subprocess.Popen([str(script), "watch", str(folder), "--server", server.url, "--model", "disc",
                                    "--out", str(out), "--settle", "0.3", "--poll", "0.1", "--after", "move"],
                                   stdout=sink, stderr=subprocess.STDOUT, env=environment)
    try:
        for number, image in enumerate(images[:3]):
            shutil.copy(image, folder / f"{number}-{image.name}")
        wait_for(lambda: len(rows_so_far(out)) == 3)
        server.stop()  # the service goes away; the watch keeps the images waiting
        for number, image in enumerate(images[3:], 3):
            shutil.copy(image, folder / f"{number}-{image.name}")
        wait_for(lambda: "does not take images" in log.read_text(), 30)
        assert len(rows_so_far(out)) == 3 and watcher.poll() is None
        server = start_server([served], tmp_path / "data", *keys, port=port)
        wait_for(lambda: len(rows_so_far(out)) == 5, 60)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=60) == 0, log.read_text()
        history = httpx.get(f"{server.url}/v1/inspections", params={"limit": 50}, headers=KEY).json()
    finally:
        server.stop()
        if watcher.poll() is None:
            watcher.kill()
    rows = rows_so_far(out)
    assert history["total"] == 5  # each image inspected once by the service
    names = [f"{number}-{image.name}" for number, image in enumerate(images)]
    assert [Path(row["path"]).name for row in rows] == names
    expected = CLIPFusion.load(model).predict(images, "disc").scores
    assert [row["score"] for row in rows] == pytest.approx([float(score) for score in expected], abs=1e-5)
    by_score = sorted((item["score"], item["decision"]) for item in history["items"])
    assert sorted((row["score"], row["decision"]) for row in rows) == by_score  # the service's own verdicts
    assert all((out / row["overlay"]).is_file() and (out / row["thumbnail"]).is_file() for row in rows)
    assert all(row["model_id"] == history["items"][0]["model_sha256"] for row in rows)


def test_watch_records_its_inspections_in_a_service_database(model, synthetic_root, tmp_path):
    """``watch --db``: each inspection also in the service's tables (through the outbox; a message sent
    again records nothing twice); a service started on that database lists them with the watch's verdicts."""
    from clipfusion.service.settings import embedded_url

    from .commands import clipfusion_here

    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[:3]
    folder, out, data = tmp_path / "incoming", tmp_path / "results", tmp_path / "data"
    folder.mkdir()
    data.mkdir()
    for number, image in enumerate(images):
        shutil.copy(image, folder / f"{number}-{image.name}")
    served = tmp_path / "disc.cfm"
    served.write_bytes(model.read_bytes())
    command = ("watch", str(folder), "--model", str(served), "--out", str(out), "--db", embedded_url(data),
               "--settle", "0.1", "--poll", "0.1", "--once", "--quiet")
    done = clipfusion_here(*command)
    assert done.returncode == 0, done.stderr
    marker = next(out.glob("outbox-db-*.delivered"))
    assert marker.read_text() == "3"
    marker.write_text("0")  # as if no acknowledgement had been kept: all three are sent again
    again = clipfusion_here(*command)
    assert again.returncode == 0 and marker.read_text() == "3", again.stderr
    rows = rows_so_far(out)
    server = start_server([served], data)
    try:
        history = httpx.get(f"{server.url}/v1/inspections", params={"model": "disc"}, timeout=30).json()
    finally:
        server.stop()
    assert history["total"] == 3  # once each, though delivered twice
    recorded = {item["filename"]: item for item in history["items"]}
    for row in rows:
        item = recorded[row["path"]]
        assert (item["score"], item["decision"], item["threshold"]) == (row["score"], row["decision"], row["threshold"])
        assert (item["width"], item["height"]) == (row["width"], row["height"]) == (96, 96)
        assert [(r["x"], r["y"], r["area"]) for r in item["regions"]] == [(r["x"], r["y"], r["area"])
                                                                          for r in row["regions"]]
