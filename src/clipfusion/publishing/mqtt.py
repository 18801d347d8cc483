"""MQTT (paho-mqtt 2.x): each message published with QoS 1 and retained (a new subscriber sees the
latest verdict), and ``send`` returns only once the broker acknowledged it (PUBACK).  The broker is
``mqtt://HOST[:PORT]/TOPIC`` (``mqtts://`` for TLS, port 8883 by default); a user name and password come
from the environment (``CLIPFUSION_MQTT_USERNAME``, ``CLIPFUSION_MQTT_PASSWORD``), never the command
line, where every user of the machine could read them."""
from __future__ import annotations

import json
import os
import ssl
from typing import Any
from urllib.parse import urlsplit

from clipfusion.errors import ClipfusionError
from clipfusion.publishing.outbox import sink_key

TIMEOUT = 10.0  # seconds to connect, and for the broker to acknowledge one message


class MqttSink:
    def __init__(self, url: str, client_id: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or not parts.path.strip("/"):
            raise ClipfusionError(f"--publish {url}: write mqtt://HOST[:PORT]/TOPIC (mqtts:// for TLS)")
        if parts.username or parts.password:
            raise ClipfusionError("--publish: put the MQTT user name and password in CLIPFUSION_MQTT_USERNAME and "
                                  "CLIPFUSION_MQTT_PASSWORD, not in the URL (the command line is visible to all)")
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ClipfusionError("--publish mqtt:// needs paho-mqtt: pip install 'clipfusion[line]'") from None
        self.name = f"MQTT {parts.hostname}:{parts.port or (8883 if parts.scheme == 'mqtts' else 1883)}"
        self.host, self.topic = parts.hostname, parts.path.strip("/")
        self.key = sink_key("mqtt", url)
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if parts.scheme == "mqtts":
            self.client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        user = os.environ.get("CLIPFUSION_MQTT_USERNAME")
        if user:
            self.client.username_pw_set(user, os.environ.get("CLIPFUSION_MQTT_PASSWORD"))
        self.client.reconnect_delay_set(1, 5)
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
