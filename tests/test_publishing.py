"""Verdicts published on the line from ``serve --publish`` and ``watch --publish opc.tcp://``: received by
a real subscriber (Debian's mosquitto) and read by a real OPC UA client (asyncua), compared with the
service's answers and the watch's rows; a message lost between an inspection's commit and its outbox line
(a crash) is sent on the next start, with the same id."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .commands import wait_for
from .servers import Subscriber, free_port, start_broker, start_server


def _images(synthetic_root: Path) -> list[Path]:
    return sorted((synthetic_root / "disc" / "test").rglob("*.png"))


class OpcUaReader:
    """An asyncua client reading clipfusion's variables by their documented node ids."""

    def __init__(self, endpoint: str) -> None:
        from asyncua.sync import Client

        self.client = Client(endpoint, timeout=10)
        self.client.connect()
        self.namespace = self.client.get_namespace_index("urn:clipfusion")

    def read(self, name: str) -> object:
        from asyncua import ua

        return self.client.get_node(ua.NodeId(ua.String(f"clipfusion.{name}"), self.namespace)).read_value()

    def close(self) -> None:
        self.client.disconnect()


def test_serve_publishes_each_stored_inspection_to_mqtt_and_opc_ua(model, synthetic_root, tmp_path):
    broker = start_broker(tmp_path / "broker")
    subscriber = Subscriber(broker.port, "line/serve")
    served = tmp_path / "disc.cfm"
    served.write_bytes(model.read_bytes())
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/clipfusion"
    publish = ["--publish", f"mqtt://127.0.0.1:{broker.port}/line/serve", "--publish", endpoint]
    server = start_server([served], tmp_path / "data", *publish)
    reader = None
    try:
        paths = _images(synthetic_root)[:3]
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
        answer = httpx.post(f"{server.url}/v1/models/disc/inspect", files=files, timeout=120)
        assert answer.status_code == 200, answer.text
        inspections = answer.json()["inspections"]
        wait_for(lambda: len(subscriber.ids()) == 3, 30)
        assert sorted(subscriber.ids()) == sorted(i["id"] for i in inspections)  # the REST API's ids
        by_id = {message["id"]: message for message in subscriber.messages}
        for inspection in inspections:
            message = by_id[inspection["id"]]
            assert (message["schema"], message["model_name"], message["source"]) == \
                ("clipfusion.inspection/1", "disc", inspection["filename"])
            assert (message["decision"], message["score"]) == (inspection["decision"], inspection["score"])
            # the REST API gives the same message, field for field
            assert httpx.get(f"{server.url}/v1/inspections/{inspection['id']}/message").json() == message
        reader = OpcUaReader(endpoint)
        decisions = [i["decision"] for i in inspections]
        assert (reader.read("disc.OkCount"), reader.read("disc.NgCount")) == (decisions.count("OK"),
                                                                              decisions.count("NG"))
        last = by_id[subscriber.ids()[-1]]
        assert (reader.read("disc.LastInspectionId"), reader.read("disc.LastDecision")) == (last["id"],
                                                                                            last["decision"])
        assert reader.read("disc.LastScore") == pytest.approx(last["score"])
        beat = reader.read("Heartbeat")
        time.sleep(1.5)
        assert reader.read("Heartbeat") > beat  # the server is alive
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'clipfusion_outbox_backlog_messages{sink="MQTT 127.0.0.1:' in metrics
        assert all(line.endswith(" 0.0") for line in metrics.splitlines()
                   if line.startswith("clipfusion_outbox_backlog_messages{"))
        reader.close()
        reader = None
        assert server.stop() in (0, -signal.SIGTERM)  # uvicorn ends by the signal it drained on
    finally:
        if reader is not None:
            reader.close()
        server.stop()

    # a crash between an inspection's commit and its message: the outbox lacks its last line
    outbox = next((tmp_path / "data" / "outbox").glob("outbox-mqtt-*.jsonl"))
    lines = outbox.read_text().splitlines()
    outbox.write_text("\n".join(lines[:-1]) + "\n")
    outbox.with_suffix(".delivered").write_text("2")
    lost = json.loads(lines[-1])["id"]
    received = len(subscriber.messages)
    server = start_server([served], tmp_path / "data", *publish)
    try:
        wait_for(lambda: len(subscriber.messages) > received, 30)
        assert [message["id"] for message in subscriber.messages[received:]] == [lost]  # again, same id
    finally:
        server.stop()
        subscriber.close()
        broker.stop()


def test_watch_shows_its_verdicts_on_its_opc_ua_server(model, synthetic_root, tmp_path):
    images = _images(synthetic_root)[:4]
    folder, out = tmp_path / "incoming", tmp_path / "results"
    folder.mkdir()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/line3"
    script = Path(sys.executable).with_name("clipfusion")
    watcher = subprocess.Popen([str(script), "watch", str(folder), "--model", str(model), "--out", str(out),
                                "--settle", "0.3", "--poll", "0.1", "--publish", endpoint],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = None
    try:
        for number, image in enumerate(images):
            shutil.copy(image, folder / f"{number}-{image.name}")
        results = out / "results.jsonl"
        wait_for(lambda: results.is_file() and len(results.read_text().splitlines()) == 4)
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        reader = OpcUaReader(endpoint)
        decisions = [row["decision"] for row in rows]
        wait_for(lambda: reader.read("disc.OkCount") + reader.read("disc.NgCount") == 4, 10)
        assert reader.read("disc.NgCount") == decisions.count("NG")
        run_id = json.loads((out / "watch.json").read_text())["run_id"]
        assert reader.read("disc.LastInspectionId") == f"{run_id}-000003"
        assert reader.read("disc.LastSource") == rows[-1]["path"]
        assert reader.read("disc.LastScore") == pytest.approx(rows[-1]["score"])
        reader.close()
        reader = None
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=60) == 0, watcher.stderr.read() if watcher.stderr else ""
    finally:
        if reader is not None:
            reader.close()
        if watcher.poll() is None:
            watcher.kill()


def _self_signed(folder: Path, name: str, uri: str) -> tuple[Path, Path]:
    """An application certificate (DER) and its key (PEM), made with asyncua's own helpers."""
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = cert_gen.generate_private_key()
    certificate = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    (folder / f"{name}.der").write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    (folder / f"{name}.pem").write_bytes(cert_gen.dump_private_key_as_pem(key))
    return folder / f"{name}.der", folder / f"{name}.pem"


def test_an_opc_ua_server_with_sign_and_encrypt_refuses_a_client_without_security(tmp_path):
    from asyncua import ua
    from asyncua.sync import Client

    from clipfusion.errors import ClipfusionError
    from clipfusion.publishing.opcua import OpcUaSink

    certificate, key = _self_signed(tmp_path, "server", "urn:freeopcua:python:server")
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/clipfusion"
    with pytest.raises(ClipfusionError, match="needs the server's own certificate"):
        OpcUaSink(f"{endpoint}?security=Basic256Sha256_SignAndEncrypt")
    sink = OpcUaSink(f"{endpoint}?security=Basic256Sha256_SignAndEncrypt&certificate={certificate}&private_key={key}")
    try:
        sink.send({"id": "run-000000", "category": "disc", "decision": "NG", "score": 0.61, "normalised_score": 0.8,
                   "threshold": 0.55, "source": "part.png", "time": "2026-12-07T06:00:00+00:00"})
        plain = Client(endpoint, timeout=5)
        try:
            with pytest.raises(ua.UaError, match="No matching endpoints"):
                plain.connect()
        finally:
            plain.tloop.stop()  # a refused client never disconnects: its own loop thread is stopped here
        client_certificate, client_key = _self_signed(tmp_path, "client", "urn:clipfusion:test-client")
        secure = Client(endpoint, timeout=5)
        secure.application_uri = "urn:clipfusion:test-client"
        secure.set_security_string(f"Basic256Sha256,SignAndEncrypt,{client_certificate},{client_key}")
        secure.connect()
        try:
            namespace = secure.get_namespace_index("urn:clipfusion")
            node = secure.get_node(ua.NodeId(ua.String("clipfusion.disc.LastDecision"), namespace))
            assert node.read_value() == "NG"
        finally:
            secure.disconnect()
    finally:
        sink.close()
