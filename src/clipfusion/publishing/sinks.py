"""From ``--publish`` URLs to outboxes: ``mqtt://``/``mqtts://`` (MQTT), ``http://``/``https://`` (a
webhook) and ``opc.tcp://`` (clipfusion's own OPC UA server)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from clipfusion.errors import ClipfusionError
from clipfusion.publishing.outbox import Outbox, Sink


def open_sink(url: str, client_name: str) -> Sink:
    """The sink of one ``--publish`` URL; ``client_name``: how this process names itself to an MQTT broker
    (stable across restarts, so that the broker keeps its session)."""
    if url.startswith(("http://", "https://")):
        from clipfusion.publishing.webhook import WebhookSink

        return WebhookSink(url)
    if url.startswith("opc.tcp://"):
        from clipfusion.publishing.opcua import OpcUaSink

        return OpcUaSink(url)
    if url.startswith(("mqtt://", "mqtts://")):
        from clipfusion.publishing.mqtt import MqttSink

        return MqttSink(url, client_name)
    raise ClipfusionError(f"--publish {url}: give mqtt://HOST[:PORT]/TOPIC, https://URL or opc.tcp://HOST:PORT/PATH")


def open_outboxes(urls: Sequence[str], folder: Path, process: str) -> list[Outbox]:
    """An outbox in ``folder`` for each ``--publish`` URL; ``process`` names this kind of process to MQTT
    brokers (``clipfusion-watch``, ``clipfusion-serve``), with a hash of ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    client = f"{process}-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]}"
    return [Outbox(folder, open_sink(url, client)) for url in urls]
