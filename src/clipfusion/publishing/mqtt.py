"""MQTT (paho-mqtt 2.x): each message published with QoS 1 and retained (a new subscriber sees the
latest verdict), and ``send`` returns only once the broker acknowledged it (PUBACK).  The broker is
``mqtt://HOST[:PORT]/TOPIC`` (``mqtts://`` for TLS, port 8883 by default); a user name and password come
from the environment (``CLIPFUSION_MQTT_USERNAME``, ``CLIPFUSION_MQTT_PASSWORD``), never the command
line, where every user of the machine could read them."""
from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from clipfusion.errors import ClipfusionError
from clipfusion.publishing.outbox import sink_key

TIMEOUT = 10.0  # seconds to connect, and for the broker to acknowledge one message


@dataclass
class Broker:
    """An MQTT client configured for ``url`` (TLS, credentials from the environment), not connected yet."""

    client: Any
    host: str
    port: int
    topic: str


def broker_client(url: str, client_id: str, option: str = "--publish") -> Broker:
    """A paho-mqtt 2.x client for ``mqtt://HOST[:PORT]/TOPIC`` (``mqtts://``: TLS, port 8883); ``option``
    names the command-line option in errors."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or not parts.path.strip("/"):
        raise ClipfusionError(f"{option} {url}: write mqtt://HOST[:PORT]/TOPIC (mqtts:// for TLS)")
    if parts.username or parts.password:
        raise ClipfusionError(f"{option}: put the MQTT user name and password in CLIPFUSION_MQTT_USERNAME and "
                              "CLIPFUSION_MQTT_PASSWORD, not in the URL (the command line is visible to all)")
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise ClipfusionError(f"{option} mqtt:// needs paho-mqtt: pip install 'clipfusion[line]'") from None
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if parts.scheme == "mqtts":
        client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
    user = os.environ.get("CLIPFUSION_MQTT_USERNAME")
    if user:
        client.username_pw_set(user, os.environ.get("CLIPFUSION_MQTT_PASSWORD"))
    client.reconnect_delay_set(1, 5)
    return Broker(client, parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883),
                  parts.path.strip("/"))


class MqttSink:
    def __init__(self, url: str, client_id: str) -> None:
        broker = broker_client(url, client_id)
        self.client, self.host, self.port, self.topic = broker.client, broker.host, broker.port, broker.topic
        self.name = f"MQTT {self.host}:{self.port}"
        self.key = sink_key("mqtt", url)
        self.connected = False

    def _connect(self) -> None:
        if not self.connected:
            self.client.connect(self.host, self.port, keepalive=30)
            self.client.loop_start()
            self.connected = True

    def send(self, message: dict[str, Any]) -> None:
        self._connect()
        info = self.client.publish(self.topic, json.dumps(message), qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            raise ConnectionError(f"the broker did not acknowledge message {message.get('id')} within {TIMEOUT:g} s")

    def close(self) -> None:
        if self.connected:
            self.client.disconnect()
            self.client.loop_stop()
