"""Webhooks (httpx): each message POSTed as JSON; ``send`` returns once the receiver answered 2xx.  With
``CLIPFUSION_WEBHOOK_SECRET`` in the environment, ``X-Clipfusion-Signature: sha256=HEX`` carries the
HMAC-SHA256 of the body, so that the receiver can check the message came from here; ``Idempotency-Key``
carries the message's id."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any
from urllib.parse import urlsplit

import httpx

from clipfusion.errors import ClipfusionError
from clipfusion.publishing.outbox import sink_key

TIMEOUT = 10.0  # seconds for the receiver to answer one message
SIGNATURE = "X-Clipfusion-Signature"


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClipfusionError(f"--publish {url}: a webhook is an http:// or https:// URL")
        if parts.username or parts.password:
            raise ClipfusionError("--publish: put no credentials in the webhook's URL; sign the messages with "
                                  "CLIPFUSION_WEBHOOK_SECRET instead")
        self.url, self.name, self.key = url, f"webhook {parts.hostname}", sink_key("webhook", url)
        secret = os.environ.get("CLIPFUSION_WEBHOOK_SECRET")
        self.secret = secret.encode() if secret else None
        self.client = httpx.Client(timeout=TIMEOUT)

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": str(message["id"])}
        if self.secret is not None:
            headers[SIGNATURE] = signature(self.secret, body)
        answer = self.client.post(self.url, content=body, headers=headers)
        if not answer.is_success:
            raise ConnectionError(f"the receiver answered {answer.status_code}")

    def close(self) -> None:
        self.client.close()
