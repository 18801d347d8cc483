"""The Ray engines (``predict``/``evaluate --engine ray``) on one local Ray cluster shared by the session:
their outputs equal the local engine's, a killed worker actor and a killed driver lose nothing and
score nothing twice, and misconfigured runs are one-line errors."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipfusion.data.base import read_rgb
from clipfusion.hardware import BF16_SCORE_TOLERANCE
from clipfusion.inspection.sources import read_sources
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.row_log import ParquetParts
from clipfusion.tasks.inputs import collect_sources

from .commands import clipfusion, clipfusion_here, results
from .servers import start_server


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, as in a Ray worker with one CPU: the local engine on this machine's threads
    sums floats in other orders; on one thread each, both engines must give the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

VOLATILE = ("seconds", "timestamp")  # what may differ between two runs of the same images


@pytest.fixture(scope="module")
def photos(synthetic_root, tmp_path_factory) -> Path:
    """The disc test images twice over (18 files: a run long enough to be interrupted) and one truncated
    PNG (unreadable: reported, never fatal)."""
    folder = tmp_path_factory.mktemp("ray") / "photos"
    for copy in "ab":
        shutil.copytree(synthetic_root / "disc" / "test", folder / copy)
    good = next(folder.rglob("*.png")).read_bytes()
    (folder / "broken.png").write_bytes(good[:len(good) // 3])
    return folder


def _image_paths(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.png") if p.name != "broken.png")


FILES = ("map", "overlay", "mask", "thumbnail")  # named by the row's position locally, by a random id by workers


def _stable(row: dict, also: tuple[str, ...] = ()) -> dict:
    return {key: value for key, value in row.items() if key not in VOLATILE + also}


@pytest.fixture(scope="module")
def local_predict(model, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "local"
    with one_thread():
        done = clipfusion_here("predict", str(photos), "--model", str(model), "--out", str(out), "--batch-size", "2",
                               "--quiet")
    assert done.returncode == 0, done.stderr
    return out


def test_predict_on_ray_writes_what_the_local_engine_writes(ray_address, cpu_kind, model_here, photos, tmp_path):
    """In both precisions: the switch of the driver reaches the workers, which run the model file in the
    precision the local engine runs it in."""
    model, local_predict, out = model_here, tmp_path / "local", tmp_path / "ray"
    with one_thread():
        local = clipfusion_here("predict", str(photos), "--model", str(model), "--out", str(local_predict),
                                "--batch-size", "2", "--quiet")
    assert local.returncode == 0, local.stderr
    done = clipfusion("predict", str(photos), "--model", str(model), "--out", str(out), "--batch-size", "2",
                      "--engine", "ray", "--ray-address", ray_address, "--quiet")
    assert done.returncode == 0, done.stderr
    local, remote = results(local_predict), results(out)
    assert [_stable(r, FILES) for r in remote] == [_stable(r, FILES) for r in local]
    for row, expected in zip(remote, local, strict=True):  # the files too, byte for byte
        for column in FILES:
            assert (row[column] is None) == (expected[column] is None)
            if row[column]:  # written by the workers (a local cluster reaches --out), named by a random id
                assert Path(row[column]).name.startswith("w")
                assert (out / row[column]).read_bytes() == (local_predict / expected[column]).read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["path"] for s in summary["skipped"]] == [str(photos / "broken.png")]
    assert summary == json.loads((local_predict / "summary.json").read_text())
    assert {row["precision"] for row in remote} == {"bfloat16" if cpu_kind == "1" else "float32"}
    # independently: the scores of the model run in this process, image by image (one copy of the images),
    # on this process's threads: float32 agrees to rounding, bfloat16 within its documented tolerance
    paths = _image_paths(photos / "a")
    expected = [float(CLIPFusion.load(model).predict([read_rgb(p)], "disc").scores[0]) for p in paths]
    scores = {row["path"]: row["score"] for row in remote}
    assert [scores[p] for p in paths] == pytest.approx(expected, abs=BF16_SCORE_TOLERANCE if cpu_kind == "1"
                                                       else 1e-5)
    # the Parquet parts hold the same rows, read back by pyarrow
    table = pq.read_table(out / "parts")
    assert table.column("path").to_pylist() == [row["path"] for row in remote]
    assert table.column("score").to_pylist() == [row["score"] for row in remote]
    assert [json.loads(r) if r else None for r in table.column("regions").to_pylist()] == \
        [row["regions"] for row in remote]


def _actor_pids() -> list[int]:
    """Processes of the inspecting actors (Ray titles them after the callable class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"InspectingActor" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # the process ended meanwhile
                continue
    return pids


def _wait_for_rows(out: Path, count: int, process: subprocess.Popen, limit: float = 240.0) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        jsonl = out / "results.jsonl"
        rows = jsonl.read_bytes().count(b"\n") if jsonl.is_file() else 0
        if rows >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"predict wrote fewer than {count} rows in {limit} s (exit {process.poll()})")


def test_a_killed_actor_and_a_killed_driver_lose_no_image_and_score_none_twice(ray_address, model, photos,
                                                                                 local_predict, tmp_path):
    out = tmp_path / "ray"
    command = [str(Path(sys.executable).with_name("clipfusion")), "predict", str(photos), "--model", str(model),
               "--out", str(out), "--batch-size", "1", "--engine", "ray", "--ray-address", ray_address, "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        written = _wait_for_rows(out, 2, process)
        actors = _actor_pids()
        assert len(actors) == 1
        os.kill(actors[0], signal.SIGKILL)  # the worker dies mid-run: Ray restarts it, the batch is retried
        _wait_for_rows(out, written + 4, process)
        assert _actor_pids() and _actor_pids() != actors  # a new actor took over
    finally:
        process.send_signal(signal.SIGKILL)  # then the driver dies
        process.communicate(timeout=60)
    interrupted = results(out)
    assert len(interrupted) < len(_image_paths(photos))
    resumed = clipfusion_here(*command[1:], "--resume")  # the driver again, in this process this time
    assert resumed.returncode == 0, resumed.stderr
    rows = results(out)
    assert sorted(row["path"] for row in rows) == _image_paths(photos)  # every image exactly once
    assert rows[:len(interrupted)] == interrupted
    local = {row["path"]: row for row in results(local_predict)}
    for row in rows:  # resumed batches are formed otherwise: equal up to float rounding
        assert row["score"] == pytest.approx(local[row["path"]]["score"], abs=1e-6)
        expected = local[row["path"]]
        assert row["decision"] == expected["decision"]
        assert [{**r, "peak": pytest.approx(r["peak"], abs=1e-6)} for r in expected["regions"]] == row["regions"]
    assert pq.read_table(out / "parts").column("path").to_pylist() == [row["path"] for row in rows]


EVALUATE = ("evaluate", "--dataset", "mvtec", "--categories", "disc", "--shots", "0", "1", "--seeds", "0", "1",
            "--preset", "tiny", "--quiet")


def _metrics(out: Path) -> dict:
    results_json = json.loads((out / "results.json").read_text())
    return {"runs": [{k: v for k, v in run.items() if k != "seconds"} for run in results_json["runs"]],
            "summary": results_json["summary"], "mean": results_json["mean"]}


def test_evaluate_on_ray_equals_the_local_engine_and_resumes(ray_address, synthetic_root, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    with one_thread():
        done = clipfusion_here(*EVALUATE, "--root", str(synthetic_root), "--out", str(local))
    assert done.returncode == 0, done.stderr
    done = clipfusion(*EVALUATE, "--root", str(synthetic_root), "--out", str(remote), "--engine", "ray",
                      "--ray-address", ray_address, "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert _metrics(remote) == _metrics(local)
    assert (remote / "per_image.csv").read_text() == (local / "per_image.csv").read_text()
    units = sorted(p.relative_to(remote) for p in (remote / "units").rglob("*.json"))
    assert units == sorted(p.relative_to(local) for p in (local / "units").rglob("*.json"))
    assert len(units) == 1 + 2  # zero-shot once, 1-shot with two seeds
    # resume: only the missing unit runs again, on the cluster this process holds
    lost = remote / "units" / "disc" / "k1_s1.json"
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (remote / "units").rglob("*.json")}
    again = clipfusion_here(*EVALUATE, "--root", str(synthetic_root), "--out", str(remote), "--engine", "ray",
                            "--ray-address", ray_address)
    assert again.returncode == 0, again.stderr
    assert lost.is_file() and all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())
    assert _metrics(remote) == _metrics(local)


def test_ray_runs_that_cannot_work_are_one_line_errors(ray_address, model, photos, tmp_path):
    gpus = clipfusion_here("predict", str(photos), "--model", str(model), "--out", str(tmp_path / "a"), "--engine",
                           "ray", "--ray-address", ray_address, "--gpus-per-worker", "1")
    assert gpus.returncode == 2 and "needs 1 GPUs but the Ray cluster has 0" in gpus.stderr
    assert len(gpus.stderr.strip().splitlines()) == 1
    cpus = clipfusion_here("predict", str(photos), "--model", str(model), "--out", str(tmp_path / "b"), "--engine",
                           "ray", "--ray-address", ray_address, "--workers", "2")
    assert cpus.returncode == 2
    assert "+ 1 for decoding and rendering needs 3 CPUs but the Ray cluster has 2" in cpus.stderr
    normal = clipfusion_here("predict", str(photos), "--category", "disc", "--preset", "tiny", "--normal",
                             str(photos), "--shots", "1", "--out", str(tmp_path / "c"), "--engine", "ray",
                             "--ray-address", ray_address)
    assert normal.returncode == 2 and "clipfusion fit --out X.cfm" in normal.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# --- pieces without a cluster ------------------------------------------------------------------------------


def test_file_uris_list_and_read_as_the_local_files(photos):
    uris = collect_sources([f"file://{photos}"])
    assert uris == [f"file://{p}" for p in sorted(str(p) for p in photos.rglob("*.png"))]
    decoded = read_sources(uris, max_pixels=10**8)
    for item, path in zip(decoded, sorted(photos.rglob("*.png")), strict=True):
        if path.name == "broken.png":
            assert item.image is None and item.reason
        else:
            assert np.array_equal(item.image, read_rgb(path)) and item.source == f"file://{path}"
    assert read_sources([f"file://{photos}/missing.png"], 10**8)[0].image is None


def test_parquet_parts_follow_the_rows_across_a_resume(tmp_path):
    fields, numbers = ("path", "score", "regions"), ("score",)
    rows = [{"path": f"{i}.png", "score": i / 10, "regions": [{"x": i}] if i % 2 else None} for i in range(8)]
    parts = ParquetParts(tmp_path, fields, numbers, part_rows=3)
    parts.sync(rows[:7])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000000.parquet", "part-000000003.parquet"]
    parts.sync(rows[:7], final=True)
    assert pq.read_table(tmp_path / "part-000000006.parquet").num_rows == 1
    ParquetParts(tmp_path, fields, numbers, part_rows=3).sync(rows, final=True)  # a resumed run
    table = pq.read_table(tmp_path)
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    assert table.column("score").to_pylist() == [r["score"] for r in rows]
    assert table.column("regions").to_pylist() == [None if r["regions"] is None else json.dumps(r["regions"],
                                                                                               separators=(",", ":"))
                                                   for r in rows]
    assert pq.read_metadata(tmp_path / "part-000000006.parquet").num_rows == 2


def test_sweep_on_ray_equals_the_local_engine(ray_address, synthetic_root, tmp_path):
    sweep = ("sweep", "--dataset", "mvtec", "--root", str(synthetic_root), "--categories", "disc", "fabric",
             "--select-on", "disc", "--shots", "1", "--preset", "tiny", "--grid", "diffusion__timestep=50,200",
             "--grid", "fusion__alpha_seg=0.2,0.8", "--quiet")
    with one_thread():
        local = clipfusion_here(*sweep, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    remote = clipfusion_here(*sweep, "--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-address",
                             ray_address, "--workers", "2")
    assert remote.returncode == 0, remote.stderr
    local_json, remote_json = (json.loads((tmp_path / name / "sweep.json").read_text()) for name in ("local", "ray"))
    assert len(remote_json["rows"]) == 2 * 2 * 2  # categories × timesteps × α: one model pass per timestep and unit
    for key in ("rows", "summary", "best", "held_out"):
        assert remote_json[key] == local_json[key]


def test_rendering_tasks_write_files_only_where_they_reach_out(model, photos, tmp_path):
    """Without a reachable --out a rendering task hands the driver bytes; with one it writes the files and
    hands names; the rows the driver then writes are the same but for the names, the files the same bytes."""
    from types import SimpleNamespace

    from clipfusion.distributed.payloads import pack_inspections, unpack_outcomes
    from clipfusion.distributed.predict import _render, workers_reach
    from clipfusion.inspection import Inspector, ModelFile
    from clipfusion.inspection.core import InspectionSettings
    from clipfusion.inspection.writer import ImageWriter

    opened = ModelFile.open(model)
    inspector = Inspector.from_model(opened)
    settings = InspectionSettings(inspector.decisions, opened.category, opened.sha256)
    inspections = inspector.inspect([*_image_paths(photos / "a")[:3], str(photos / "broken.png")])
    payload = {"batch": 0, "payload": pack_inspections(inspections)}
    by_driver = unpack_outcomes(_render(payload, settings, None)["payload"])
    by_worker = unpack_outcomes(_render(payload, settings, str(tmp_path / "worker"))["payload"])
    assert by_driver[-1] == by_worker[-1] == (str(photos / "broken.png"), by_driver[-1][1])  # the failure, as is
    driver_writer, worker_writer = ImageWriter(tmp_path / "driver"), ImageWriter(tmp_path / "worker")
    for index, (sent, stored) in enumerate(zip(by_driver[:-1], by_worker[:-1], strict=True)):
        assert sent.files and sent.names is None and not stored.files and stored.names
        row, stored_row = driver_writer.write(f"{index:06d}_x", sent), worker_writer.write("unused", stored)
        assert {k: v for k, v in row.items() if k not in FILES} == {k: v for k, v in stored_row.items()
                                                                    if k not in FILES}
        for column in FILES:
            if row[column]:
                assert (tmp_path / "driver" / row[column]).read_bytes() == \
                    (tmp_path / "worker" / stored_row[column]).read_bytes()

    def cluster(*addresses: str) -> SimpleNamespace:
        return SimpleNamespace(util=SimpleNamespace(get_node_ip_address=lambda: "10.0.0.1"),
                               nodes=lambda: [{"NodeManagerAddress": a, "Alive": True} for a in addresses])

    assert workers_reach(cluster("10.0.0.1"), shared_out=False)
    assert not workers_reach(cluster("10.0.0.1", "10.0.0.2"), shared_out=False)
    assert workers_reach(cluster("10.0.0.1", "10.0.0.2"), shared_out=True)


def test_what_travels_between_the_stages_is_arrays_and_records(model, photos):
    """Each stage's payload reads back equal (pixels, maps, masks, regions, numbers, file bytes) from a
    plain .npz that numpy loads with allow_pickle=False: data, never code."""
    import io

    from clipfusion.distributed import payloads
    from clipfusion.inspection import Inspector
    from clipfusion.inspection.writer import render

    sources = [*_image_paths(photos / "a")[:3], str(photos / "broken.png")]
    decoded = read_sources(sources, 10**8)
    back = payloads.unpack_decoded(payloads.pack_decoded(decoded))
    assert [(d.source, d.reason, d.seconds) for d in back] == [(d.source, d.reason, d.seconds) for d in decoded]
    assert all((a.image is None and b.image is None) or np.array_equal(a.image, b.image)
               for a, b in zip(back, decoded, strict=True))
    inspector = Inspector.from_model(model)
    inspections = inspector.inspect_decoded(decoded)
    again = payloads.unpack_inspections(payloads.pack_inspections(inspections))
    for got, sent in zip(again, inspections, strict=True):
        assert (got.source, got.score, got.decision, got.regions, got.error, got.precision) == \
            (sent.source, sent.score, sent.decision, sent.regions, sent.error, sent.precision)
        for name in payloads.INSPECTION_ARRAYS:
            assert (getattr(got, name) is None) == (getattr(sent, name) is None)
            if getattr(sent, name) is not None:
                assert np.array_equal(getattr(got, name), getattr(sent, name))
    outcomes = [render(i, inspector.decisions) if i.ok else (i.source, str(i.error)) for i in inspections]
    packed = payloads.pack_outcomes(outcomes)
    assert payloads.unpack_outcomes(packed) == outcomes
    with np.load(io.BytesIO(packed), allow_pickle=False) as stored:
        assert all(stored[name].dtype != object for name in stored.files)


def test_serve_runs_the_model_replicas_on_ray_serve_and_learning_reaches_them(model, synthetic_root, tmp_path,
                                                                              ray_address):
    """``serve --engine ray --replicas 2``: the model pass runs on a Ray Serve deployment of two replicas
    (the service's own process keeps the API, decisions and database): scores equal the detector run
    here; after learning, every replica scores with the learned version; stopping deletes the deployment."""
    from ray import serve

    server = start_server([model], tmp_path / "data", "--engine", "ray", "--ray-address", ray_address, "--replicas",
                          "2", "--cpus-per-replica", "0.5", "--learn", "--min-normals", "1")
    try:
        paths = sorted((synthetic_root / "disc" / "test").rglob("*.png"))

        def inspect(images: list[Path]) -> list[dict]:
            answer = httpx.post(f"{server.url}/v1/models/disc/inspect", timeout=120,
                                files=[("files", (p.name, p.read_bytes(), "image/png")) for p in images])
            assert answer.status_code == 200, answer.text
            return answer.json()["inspections"]

        inspections = inspect(paths)
        detector = CLIPFusion.load(model)
        expected = detector.predict(paths, "disc").scores
        # a replica batches and threads otherwise than this process: bfloat16 sums in another order
        tolerance = BF16_SCORE_TOLERANCE if str(detector.precision) == "bfloat16" else 1e-5
        assert [i["score"] for i in inspections] == pytest.approx([float(s) for s in expected], abs=tolerance)
        [application] = [a for name, a in serve.status().applications.items() if name == "clipfusion-disc"]
        [deployment] = application.deployments.values()
        assert deployment.replica_states.get("RUNNING") == 2

        alarm, path = next((i, p) for i, p in zip(inspections, paths, strict=True) if i["decision"] == "NG")
        learned = httpx.post(f"{server.url}/v1/inspections/{alarm['id']}/feedback", json={"label": "normal"},
                             timeout=120).json()["learned"]
        relearned = float(CLIPFusion.load(model).add_references([path], "disc").predict([path], "disc").scores[0])
        with ThreadPoolExecutor(max_workers=6) as pool:  # enough at once for both replicas to take some
            after = [i for answer in pool.map(lambda _: inspect([path]), range(6)) for i in answer]
        assert {i["model_sha256"] for i in after} == {learned["sha256"]}
        assert all(i["score"] == pytest.approx(relearned, abs=tolerance) for i in after)
    finally:
        server.stop()
    assert "clipfusion-disc" not in serve.status().applications
