"""``clipfusion serve`` over HTTP on loopback: the API's answers checked against the detector run
in this process, the database (SQLite, and a real PostgreSQL server), limits, keys and metrics."""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from PIL import Image
from sqlalchemy import create_engine, text

from clipfusion.data import read_rgb
from clipfusion.hardware import BF16_SCORE_TOLERANCE
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.clipfusion.model_file import read_card
from clipfusion.service.database import make_engine, migrate
from clipfusion.service.tables import Base

from .commands import clipfusion_here
from .conftest import API_KEY
from .servers import start_postgres, start_server

KEY = {"X-API-Key": API_KEY}


def _images(synthetic_root: Path) -> list[Path]:
    return sorted((synthetic_root / "disc" / "test").rglob("*.png"))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _inspect(url: str, paths: list[Path], **kwargs) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{url}/v1/models/disc/inspect", files=files, headers=KEY, timeout=120, **kwargs)


def test_inspections_equal_the_detector_run_here(service, model, synthetic_root):
    paths = _images(synthetic_root)[:5]
    answer = _inspect(service.url, paths)
    assert answer.status_code == 200, answer.text
    inspections = answer.json()["inspections"]
    assert [i["filename"] for i in inspections] == [p.name for p in paths]
    detector = CLIPFusion.load(model)
    prediction = detector.predict(paths, "disc")
    thresholds = detector.thresholds_
    assert [i["score"] for i in inspections] == pytest.approx(prediction.scores.tolist(), abs=1e-5)
    assert [i["decision"] for i in inspections] == ["NG" if s > thresholds.image else "OK"
                                                    for s in prediction.scores]
    for inspection, regions, path in zip(inspections, prediction.regions(min_area=1), paths, strict=True):
        assert [(r["x"], r["y"], r["width"], r["height"], r["area"]) for r in inspection["regions"]] == \
            [(r.x, r.y, r.width, r.height, r.area) for r in regions]
        overlay = httpx.get(service.url + inspection["overlay_url"], headers=KEY)
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(overlay.content)).width == read_rgb(path).shape[1]
        mask = httpx.get(f"{service.url}/v1/inspections/{inspection['id']}/mask.png", headers=KEY)
        assert mask.status_code == (200 if inspection["decision"] == "NG" else 404)


def test_a_raw_image_body_is_one_inspection(service, synthetic_root):
    path = _images(synthetic_root)[0]
    answer = httpx.post(f"{service.url}/v1/models/disc/inspect?filename=raw.png", content=path.read_bytes(),
                        headers={**KEY, "Content-Type": "image/png"}, timeout=60)
    assert answer.status_code == 200, answer.text
    [inspection] = answer.json()["inspections"]
    again = httpx.get(f"{service.url}/v1/inspections/{inspection['id']}", headers=KEY).json()
    assert again == inspection and again["filename"] == "raw.png"


def test_history_filters_pages_and_orders_newest_first(service, synthetic_root):
    _inspect(service.url, _images(synthetic_root)[:6])
    page = httpx.get(f"{service.url}/v1/inspections", params={"limit": 500}, headers=KEY).json()
    everything = page["items"]
    assert page["total"] == len(everything) >= 6
    created = [item["created"] for item in everything]
    assert created == sorted(created, reverse=True)
    ng = httpx.get(f"{service.url}/v1/inspections", params={"decision": "NG", "limit": 500}, headers=KEY).json()
    assert [i["id"] for i in ng["items"]] == [i["id"] for i in everything if i["decision"] == "NG"]
    second = httpx.get(f"{service.url}/v1/inspections", params={"limit": 2, "offset": 2}, headers=KEY).json()
    assert [i["id"] for i in second["items"]] == [i["id"] for i in everything[2:4]]
    later = httpx.get(f"{service.url}/v1/inspections", params={"since": created[0], "limit": 500}, headers=KEY)
    assert all(item["created"] >= created[0] for item in later.json()["items"])


def test_feedback_is_recorded_and_filterable(service, synthetic_root):
    [inspection] = _inspect(service.url, _images(synthetic_root)[:1]).json()["inspections"]
    url = f"{service.url}/v1/inspections/{inspection['id']}"
    posted = httpx.post(f"{url}/feedback", json={"label": "normal", "note": "scratch on the fixture"}, headers=KEY)
    assert posted.status_code == 201 and posted.json()["label"] == "normal"
    assert httpx.get(url, headers=KEY).json()["feedback"][0]["note"] == "scratch on the fixture"
    marked = httpx.get(f"{service.url}/v1/inspections", params={"feedback": "normal", "limit": 500}, headers=KEY)
    assert inspection["id"] in [i["id"] for i in marked.json()["items"]]
    unmarked = httpx.get(f"{service.url}/v1/inspections", params={"feedback": "none", "limit": 500}, headers=KEY)
    assert inspection["id"] not in [i["id"] for i in unmarked.json()["items"]]
    wrong = httpx.post(f"{url}/feedback", json={"label": "maybe"}, headers=KEY)
    assert wrong.status_code == 422 and wrong.json()["code"] == "invalid_request" and "label" in wrong.json()["detail"]


@pytest.mark.parametrize(("request_kwargs", "status", "code"), [
    ({"path": "/v1/models/screw/inspect", "files": {"files": ("a.png", b"x", "image/png")}}, 404, "unknown_model"),
    ({"files": {"files": ("notes.png", b"not an image at all", "image/png")}}, 422, "unreadable_image"),
    ({"files": {"files": ("big.bin", bytes(600_000), "image/png")}}, 413, "upload_too_large"),
    ({"files": {"files": ("wide.png", _png(np.zeros((100, 250, 3), np.uint8)), "image/png")}}, 413,
     "image_too_large"),
    ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415, "unsupported_media_type"),
    ({"path": "/v1/inspections/0123456789abcdef0123456789abcdef"}, 404, "unknown_inspection"),
])
def test_bad_requests_get_json_errors_with_stable_codes(service, request_kwargs, status, code):
    kwargs = dict(request_kwargs)
    path = kwargs.pop("path", "/v1/models/disc/inspect")
    method = "GET" if path.startswith("/v1/inspections") else "POST"
    answer = httpx.request(method, service.url + path, headers={**KEY, **kwargs.pop("headers", {})}, timeout=60,
                           **kwargs)
    assert answer.status_code == status
    body = answer.json()
    assert body["code"] == code and body["detail"] and "\n" not in body["detail"]


def test_without_a_valid_key_nothing_is_answered_and_keys_are_never_logged(service):
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        answer = httpx.get(f"{service.url}/v1/models", headers=headers)
        assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"
    assert httpx.get(f"{service.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{service.url}/healthz").status_code == 200  # probes need no key
    assert API_KEY not in service.log.read_text()


def test_models_health_and_metrics(service, model):
    [served] = httpx.get(f"{service.url}/v1/models", headers=KEY).json()
    card = CLIPFusion.load(model)
    assert (served["name"], served["category"], served["preset"]) == ("disc", "disc", "tiny")
    assert served["image_threshold"] == card.thresholds_.image and served["bank_size"] == 2
    # fitted and served on one machine: the precision its thresholds were derived in is the one that runs
    assert served["precision"] == served["thresholds_precision"] == read_card(model).dtype
    assert httpx.get(f"{service.url}/readyz").json() == {"status": "ready"}
    metrics = httpx.get(f"{service.url}/metrics").text
    for name in ("clipfusion_requests_total", "clipfusion_request_seconds_bucket", "clipfusion_queue_depth",
                 "clipfusion_batch_size_bucket", "clipfusion_model_seconds_bucket", "clipfusion_decisions_total"):
        assert name in metrics


def test_the_service_runs_a_model_in_the_precision_the_library_runs_it(cpu_kind, model_here, synthetic_root,
                                                                      tmp_path):
    """On either CPU kind (the switch reaches the server): the served model reports the precision it runs
    in, and its inspections equal the library's in this process, within that precision's tolerance."""
    paths = _images(synthetic_root)[:5]
    server = start_server([model_here], tmp_path / "data")
    try:
        [served] = httpx.get(f"{server.url}/v1/models").json()
        answer = httpx.post(f"{server.url}/v1/models/disc/inspect", timeout=120,
                            files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
    finally:
        server.stop()
    runs = "bfloat16" if cpu_kind == "1" else "float32"
    assert (served["precision"], served["thresholds_precision"]) == (runs, runs)
    assert answer.status_code == 200, answer.text
    expected = CLIPFusion.load(model_here).predict(paths, "disc").scores
    assert [i["score"] for i in answer.json()["inspections"]] == \
        pytest.approx(expected.tolist(), abs=BF16_SCORE_TOLERANCE if runs == "bfloat16" else 1e-5)


def test_a_request_larger_than_the_queue_is_refused_whole_with_retry_after(service, synthetic_root):
    paths = (_images(synthetic_root) * 2)[:9]  # 9 images > --max-queue 8
    before = httpx.get(f"{service.url}/v1/inspections", params={"limit": 1}, headers=KEY).json()["total"]
    answer = _inspect(service.url, paths)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1" and answer.json()["code"] == "queue_full"
    after = httpx.get(f"{service.url}/v1/inspections", params={"limit": 1}, headers=KEY).json()["total"]
    assert after == before  # all or none
    assert _inspect(service.url, paths[:2]).status_code == 200  # and the service goes on


def test_concurrent_clients_are_all_answered_and_recorded_once(service, synthetic_root, tmp_path):
    paths = _images(synthetic_root)
    clients, requests = 8, 25
    latencies: list[float] = []
    statuses: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        with httpx.Client(headers=KEY, timeout=120) as session:
            for index in range(requests):
                path = paths[(number + index) % len(paths)]
                start = time.perf_counter()
                answer = session.post(f"{service.url}/v1/models/disc/inspect",
                                      files=[("files", (f"c{number}-{index}.png", path.read_bytes(), "image/png"))])
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses.append(answer.status_code)
                    if answer.status_code == 200:
                        ids.extend(i["id"] for i in answer.json()["inspections"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert statuses.count(200) == clients * requests and len(set(ids)) == clients * requests
    history = httpx.get(f"{service.url}/v1/inspections", params={"limit": 500}, headers=KEY).json()["items"]
    history += httpx.get(f"{service.url}/v1/inspections", params={"limit": 500, "offset": 500}, headers=KEY
                         ).json()["items"]
    recorded = [i["id"] for i in history if i["filename"].startswith("c") and "-" in i["filename"]]
    assert sorted(recorded) == sorted(ids)  # every inspection in the database exactly once
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    artefacts = Path(__file__).resolve().parents[1] / "test-artifacts"
    artefacts.mkdir(exist_ok=True)
    (artefacts / "service-load.txt").write_text(f"{clients} clients x {requests} requests, tiny preset: "
                                                f"p50 {p50:.3f} s, p95 {p95:.3f} s, p99 {p99:.3f} s\n")
    metrics = httpx.get(f"{service.url}/metrics").text
    batch_count = next(line for line in metrics.splitlines() if line.startswith("clipfusion_batch_size_count"))
    batch_sum = next(line for line in metrics.splitlines() if line.startswith("clipfusion_batch_size_sum"))
    assert float(batch_sum.split()[-1]) / float(batch_count.split()[-1]) > 1.0  # requests were coalesced


def test_the_migrations_build_the_orm_schema_on_sqlite_and_postgresql(tmp_path):
    """`clipfusion db upgrade` and serve's own migration build the ORM's schema; on PostgreSQL two
    migrations started together (two services against one database) take turns instead of racing."""
    postgres = start_postgres()
    try:
        racing = [make_engine(postgres.url) for _ in range(2)]
        errors: list[BaseException] = []

        def run(engine) -> None:
            try:
                migrate(engine)
            except BaseException as exc:  # collected: the test fails naming it
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(engine,)) for engine in racing]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        for engine in racing:
            engine.dispose()
        for url in (f"sqlite:///{tmp_path / 'schema.db'}", postgres.url):
            done = clipfusion_here("db", "upgrade", "--db", url)
            assert done.returncode == 0 and done.stdout.strip().endswith("-> 0005"), done.stderr
            engine = make_engine(url)
            migrate(engine)  # idempotent
            with engine.connect() as connection:
                assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            engine.dispose()
        assert "empty -> 0005" in clipfusion_here("db", "upgrade", "--data", str(tmp_path / "fresh")).stdout
    finally:
        postgres.stop()


def test_the_service_on_postgresql(model, synthetic_root, tmp_path):
    postgres = start_postgres()
    server = None
    try:
        server = start_server([model], tmp_path / "data", "--db", postgres.url)
        paths = _images(synthetic_root)[:3]
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
        answer = httpx.post(f"{server.url}/v1/models/disc/inspect", files=files, timeout=120)
        assert answer.status_code == 200, answer.text
        ids = [i["id"] for i in answer.json()["inspections"]]
        assert httpx.post(f"{server.url}/v1/inspections/{ids[0]}/feedback", json={"label": "anomalous"}
                          ).status_code == 201
        assert not (tmp_path / "data" / "inspections.db").exists()  # nothing went to SQLite
        with create_engine(postgres.url).connect() as connection:
            stored = connection.execute(text("SELECT id, score FROM inspections ORDER BY id")).all()
            labels = connection.execute(text("SELECT label FROM feedback")).scalars().all()
        scores = {i["id"]: i["score"] for i in answer.json()["inspections"]}
        assert sorted(scores) == [row.id for row in stored]
        assert all(scores[row.id] == pytest.approx(row.score) for row in stored) and labels == ["anomalous"]
    finally:
        if server:
            server.stop()
        postgres.stop()


def test_learning_from_a_false_alarm_and_rolling_it_back(model, synthetic_root, tmp_path):
    data = tmp_path / "data"
    server = start_server([model], data, "--learn", "--min-normals", "1")
    try:
        paths = _images(synthetic_root)
        inspections = _inspect(server.url, paths).json()["inspections"]
        by_id = {i["id"]: (i, p) for i, p in zip(inspections, paths, strict=True)}
        alarms = [i for i in inspections if i["decision"] == "NG"]
        normals = [i for i in inspections if i["decision"] == "OK"]
        assert len(alarms) >= 2 and normals
        first, path = by_id[alarms[0]["id"]]
        answer = httpx.post(f"{server.url}/v1/inspections/{first['id']}/feedback", json={"label": "normal"},
                            timeout=120).json()
        learned = answer["learned"]
        assert learned["action"] == "learn" and learned["bank_size"] == 3
        assert "thresholds kept: 0 operator-confirmed" in learned["note"]  # none outside the bank yet
        # a double click: the same verdict again is the first one (200), and learns nothing more
        twice = httpx.post(f"{server.url}/v1/inspections/{first['id']}/feedback", json={"label": "normal"},
                           timeout=120)
        assert twice.status_code == 200 and twice.json()["id"] == answer["id"] and twice.json()["learned"] is None
        assert len(httpx.get(f"{server.url}/v1/models/disc/versions").json()) == 2
        assert len(httpx.get(f"{server.url}/v1/inspections/{first['id']}").json()["feedback"]) == 1
        # the service now scores with the bank plus that image: recomputed here from the original file
        expected = CLIPFusion.load(model).add_references([path], "disc").predict([path], "disc").scores[0]
        again = _inspect(server.url, [path]).json()["inspections"][0]
        assert again["score"] == pytest.approx(float(expected), abs=1e-5) and again["score"] < first["score"]
        assert again["model_sha256"] == learned["sha256"] != first["model_sha256"]

        # an OK image confirmed normal, then a second false alarm: thresholds re-derived from that image
        confirmed, confirmed_path = by_id[normals[0]["id"]]
        assert httpx.post(f"{server.url}/v1/inspections/{confirmed['id']}/feedback",
                          json={"label": "normal"}).json()["learned"] is None  # not a false alarm: nothing learned
        second, second_path = by_id[alarms[1]["id"]]
        relearned = httpx.post(f"{server.url}/v1/inspections/{second['id']}/feedback", json={"label": "normal"},
                               timeout=120).json()["learned"]
        detector = CLIPFusion.load(model).add_references([path, second_path], "disc")
        assert "re-derived from 1" in relearned["note"]
        assert relearned["image_threshold_after"] == pytest.approx(
            float(detector.predict([confirmed_path], "disc").scores[0]), abs=1e-5)  # the 99% quantile of one
        assert httpx.post(f"{server.url}/v1/models/disc/rollback").json()["action"] == "rollback"

        rolled = httpx.post(f"{server.url}/v1/models/disc/rollback").json()
        assert rolled["action"] == "rollback" and rolled["sha256"] == first["model_sha256"]
        back = _inspect(server.url, [path]).json()["inspections"][0]
        assert back["score"] == pytest.approx(first["score"], abs=1e-5)
        none_left = httpx.post(f"{server.url}/v1/models/disc/rollback")
        assert none_left.status_code == 409 and none_left.json()["code"] == "no_earlier_version"
        versions = httpx.get(f"{server.url}/v1/models/disc/versions").json()
        assert [v["active"] for v in versions].count(True) == 1 and versions[-1]["active"]
        actions = [entry["action"] for entry in httpx.get(f"{server.url}/v1/models/disc/audit").json()]
        assert actions == ["rollback", "rollback", "learn", "learn"]
        # a false alarm whose upload is gone: 409, and its verdict is not kept (it can be given again)
        gone = alarms[2] if len(alarms) > 2 else _inspect(server.url, [second_path]).json()["inspections"][0]
        stored = httpx.get(f"{server.url}/v1/inspections/{gone['id']}").json()
        for upload in (data / "files" / "images").glob(f"{gone['id']}*"):
            upload.unlink()
        refused = httpx.post(f"{server.url}/v1/inspections/{gone['id']}/feedback", json={"label": "normal"})
        assert refused.status_code == 409 and refused.json()["code"] == "image_not_stored", stored
        assert httpx.get(f"{server.url}/v1/inspections/{gone['id']}").json()["feedback"] == []
        # learning again after the rollbacks: a new inspection of the first image, confirmed normal
        anew = _inspect(server.url, [path]).json()["inspections"][0]
        assert anew["decision"] == "NG"
        assert httpx.post(f"{server.url}/v1/inspections/{anew['id']}/feedback", json={"label": "normal"},
                          timeout=120).json()["learned"]["bank_size"] == 3
    finally:
        server.stop()
    restarted = start_server([model], data, "--learn")  # the learned version survives a restart
    try:
        [served] = httpx.get(f"{restarted.url}/v1/models").json()
        active = [v for v in httpx.get(f"{restarted.url}/v1/models/disc/versions").json() if v["active"]]
        assert served["sha256"] == active[0]["sha256"] != first["model_sha256"] and served["bank_size"] == 3
    finally:
        restarted.stop()


def test_two_replicas_share_the_load_and_a_learned_version_reaches_both(model, synthetic_root, tmp_path):
    server = start_server([model], tmp_path / "data", "--replicas", "2", "--max-batch", "1", "--learn",
                          "--min-normals", "1")
    try:
        paths = _images(synthetic_root)
        inspections = _inspect(server.url, paths).json()["inspections"]
        alarm, path = next((i, p) for i, p in zip(inspections, paths, strict=True) if i["decision"] == "NG")
        learned = httpx.post(f"{server.url}/v1/inspections/{alarm['id']}/feedback", json={"label": "normal"},
                             timeout=120).json()["learned"]

        def concurrently(count: int) -> list[dict[str, object]]:
            with ThreadPoolExecutor(max_workers=count) as pool:
                answers = list(pool.map(lambda _: _inspect(server.url, [path]), range(count)))
            assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
            return [answer.json()["inspections"][0] for answer in answers]

        expected = CLIPFusion.load(model).add_references([path], "disc").predict([path], "disc").scores[0]
        after = concurrently(6)
        assert {i["model_sha256"] for i in after} == {learned["sha256"]}  # whichever replica scored it
        # each replica runs on one core: bfloat16 kernels then sum in another order than this process's
        [served] = httpx.get(f"{server.url}/v1/models").json()
        tolerance = BF16_SCORE_TOLERANCE if served["precision"] == "bfloat16" else 1e-5
        assert all(i["score"] == pytest.approx(float(expected), abs=tolerance) for i in after)
        batches = {line.split('replica="')[1].split('"')[0]: float(line.split()[-1])
                   for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                   if line.startswith("clipfusion_replica_batches_total{")}
        assert set(batches) == {"0", "1"} and min(batches.values()) >= 1, batches  # both replicas ran batches
        httpx.post(f"{server.url}/v1/models/disc/rollback", timeout=120).raise_for_status()
        assert {i["model_sha256"] for i in concurrently(4)} == {alarm["model_sha256"]}
    finally:
        server.stop()
