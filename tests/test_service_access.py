"""Who may do what, and what the service says about it: named keys with roles (operators inspect and give
feedback, admins learn and roll back; the acting key's name in the audit table and the log, never the
key), the old one-key-per-line files, structured JSON logs with the request id, and the API's own page
only on request, served without a CDN and behind the key."""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from clipfusion.errors import ClipfusionError
from clipfusion.service.settings import ApiKey, read_api_keys

from .conftest import API_KEY
from .servers import start_server

OPERATOR, ADMIN = "op-secret-91c3", "admin-secret-4d7a"


def test_a_key_file_names_each_key_and_its_role_and_old_files_still_load(tmp_path, warnings_said):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# NAME ROLE KEY\nline-3 operator {OPERATOR}\n\nsupervisor admin {ADMIN}\n")
    assert read_api_keys(str(keys)) == (ApiKey("line-3", "operator", OPERATOR), ApiKey("supervisor", "admin", ADMIN))
    assert OPERATOR not in repr(read_api_keys(str(keys)))  # a key printed in a traceback shows no secret

    keys.write_text(f"# before roles: one key per line\n{OPERATOR}\n{ADMIN}\n")
    assert read_api_keys(str(keys)) == (ApiKey("line-2", "operator", OPERATOR), ApiKey("line-3", "operator", ADMIN))
    [warning] = warnings_said()
    assert "lines 2, 3" in warning and "operator keys" in warning and OPERATOR not in warning

    for text, says in ((f"boss superuser {ADMIN}\n", "line 1: write NAME ROLE KEY"),
                       (f"a operator {OPERATOR}\na admin {ADMIN}\n", "one name twice"),
                       (f"a operator {OPERATOR}\nb admin {OPERATOR}\n", "one key twice"),
                       ("# nothing\n", "holds no key")):
        keys.write_text(text)
        with pytest.raises(ClipfusionError, match=says):
            read_api_keys(str(keys))


def _json_lines(log: Path) -> list[dict[str, object]]:
    """The log's JSON lines (the start-up line on stdout is plain text)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_operators_inspect_and_give_feedback_admins_learn_and_roll_back(model, synthetic_root, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"line-1 operator {OPERATOR}\nboss admin {ADMIN}\n")
    server = start_server([model], tmp_path / "data", "--learn", "--min-normals", "1", "--api-key-file", str(keys),
                          "--log-format", "json")
    operator, admin = {"X-API-Key": OPERATOR}, {"Authorization": f"Bearer {ADMIN}"}
    try:
        paths = sorted((synthetic_root / "disc" / "test").rglob("*.png"))
        answer = httpx.post(f"{server.url}/v1/models/disc/inspect", headers=operator, timeout=120,
                            files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths]).json()
        alarm = next(i for i in answer["inspections"] if i["decision"] == "NG")
        passed = next(i for i in answer["inspections"] if i["decision"] == "OK")

        # an operator's false alarm is recorded under its key's name, and not learned from
        feedback = httpx.post(f"{server.url}/v1/inspections/{alarm['id']}/feedback", json={"label": "normal"},
                              headers=operator, timeout=120)
        assert feedback.status_code == 201 and feedback.json()["learned"] is None
        assert feedback.json()["actor"] == "line-1" and "admin" in feedback.json()["learning"]
        assert len(httpx.get(f"{server.url}/v1/models/disc/versions", headers=operator).json()) == 1
        for path in (f"/v1/inspections/{alarm['id']}/learn", "/v1/models/disc/rollback"):
            refused = httpx.post(server.url + path, headers={**operator, "X-Request-ID": "trail-7"})
            assert refused.status_code == 403 and refused.json()["code"] == "forbidden", path

        # an admin confirms it: a new version, once
        learned = httpx.post(f"{server.url}/v1/inspections/{alarm['id']}/learn", headers=admin, timeout=120)
        assert learned.status_code == 200 and learned.json()["action"] == "learn" and learned.json()["bank_size"] == 3
        again = httpx.post(f"{server.url}/v1/inspections/{alarm['id']}/learn", headers=admin, timeout=120)
        assert again.status_code == 409 and again.json()["code"] == "already_learned"
        unconfirmed = httpx.post(f"{server.url}/v1/inspections/{passed['id']}/learn", headers=admin)
        assert unconfirmed.status_code == 409 and unconfirmed.json()["code"] == "not_a_false_alarm"
        rolled = httpx.post(f"{server.url}/v1/models/disc/rollback", headers=admin, timeout=120)
        assert rolled.status_code == 200 and rolled.json()["sha256"] == alarm["model_sha256"]

        trail = httpx.get(f"{server.url}/v1/models/disc/audit", headers=operator).json()
        assert [(entry["action"], entry["actor"]) for entry in trail] == [("rollback", "boss"), ("learn", "boss")]
        assert httpx.get(f"{server.url}/v1/inspections/{alarm['id']}", headers=operator
                         ).json()["feedback"][0]["actor"] == "line-1"
        # without --docs the API's page and schema are not served at all
        assert httpx.get(f"{server.url}/docs").status_code == httpx.get(f"{server.url}/openapi.json",
                                                                          headers=admin).status_code == 404
    finally:
        server.stop()

    lines = _json_lines(server.log)
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    refusals = [line for line in lines if line.get("request_id") == "trail-7"]
    assert [(line["logger"], line["status"], line["actor"]) for line in refusals] == [
        ("clipfusion.access", 403, "line-1")] * 2
    learning = [line for line in lines if line["logger"] == "clipfusion.access" and "/learn" in str(line["path"])
                and line["request_id"] != "trail-7"]
    assert [line["status"] for line in learning] == [200, 409, 409]
    assert all(re.fullmatch(r"[0-9a-f]{32}", str(line["request_id"])) for line in learning)  # given one each
    text = server.log.read_text()
    assert OPERATOR not in text and ADMIN not in text


def test_the_api_page_is_served_from_the_package_and_its_schema_behind_the_key(service):
    assert httpx.get(f"{service.url}/openapi.json").status_code == 401
    schema = httpx.get(f"{service.url}/openapi.json", headers={"X-API-Key": API_KEY})
    assert schema.status_code == 200 and "/v1/models/{name}/inspect" in schema.json()["paths"]
    page = httpx.get(f"{service.url}/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/docs-static/swagger-ui-bundle.js" in sources and all(s.startswith(("/", "data:")) for s in sources)
    for source in sources:
        if source.startswith("/"):
            assert httpx.get(service.url + source).status_code == 200, source
