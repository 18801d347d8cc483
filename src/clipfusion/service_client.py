"""A client of a running ``clipfusion serve``: how ``watch --server URL`` scores without loading a second
copy of the model (a 24 GB inspection PC cannot hold two ``fast`` models).

Each image is one request, so one image's refusal is its own; its ``Idempotency-Key`` is derived from what
the watch's ledger knows of it (a file's path, size and time; a video's frame), so a request retried after
a lost answer — or after the watch restarted — gets the inspection the service already made, never a
second one.  While the service does not answer (down, restarting, busy: 503, 504) the image waits and is
sent again with backoff; nothing is dropped.  The rows are ``predict``'s: the verdict from the service, its
overlay and mask fetched from it, a thumbnail made here (the raw map stays with the service).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
from PIL import Image

from clipfusion.errors import ClipfusionError
from clipfusion.feeds.base import FeedItem, Stopped
from clipfusion.inspection.writer import Outcome, Pictures, Rendered, keeps_pictures
from clipfusion.overlays import png_bytes, thumbnail_jpeg

logger = logging.getLogger(__name__)
API_KEY_VARIABLE = "CLIPFUSION_API_KEY"
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
RETRIED = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})  # the service's state, not the image's fault


class ServiceClient:
    """Scores with model ``model`` of the service at ``url`` (key from ``CLIPFUSION_API_KEY``)."""

    def __init__(self, url: str, model: str, run_id: str = "", pictures: Pictures = "all",
                 timeout: float = 120.0) -> None:
        headers = {"X-API-Key": os.environ[API_KEY_VARIABLE]} if os.environ.get(API_KEY_VARIABLE) else {}
        self.url, self.model, self.run_id, self.pictures = url.rstrip("/"), model, run_id, pictures
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        try:
            answer = self.http.get("/v1/models")
        except httpx.TransportError as exc:
            raise ClipfusionError(f"--server {url}: cannot reach it ({exc}); start `clipfusion serve` there, or "
                                  "check the address") from None
        if answer.status_code in (401, 403):
            raise ClipfusionError(f"--server {url} refused the key ({answer.status_code}): put an operator key in "
                                  f"{API_KEY_VARIABLE}")
        if answer.status_code != 200:
            raise ClipfusionError(f"--server {url}: /v1/models answered {answer.status_code}; is it clipfusion serve?")
        served = {entry["name"]: entry for entry in answer.json()}
        if model not in served:
            raise ClipfusionError(f"--server {url} serves no model {model!r} (it serves {', '.join(served)}): give "
                                  "one of those as --model")
        self.info: dict[str, Any] = served[model]

    def key(self, item: FeedItem) -> str:
        """The image's idempotency key: the watch's run and what the ledger knows of the image."""
        identity = json.dumps(item.entry, sort_keys=True)
        return f"watch-{self.run_id}-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"

    def inspect(self, items: Sequence[FeedItem], stop: threading.Event) -> list[Outcome]:
        """Each item's rendered inspection (or its source and why it has none), in order; raises
        :class:`Stopped` if ``stop`` is set while the service does not answer."""
        return [self._one(item, stop) for item in items]

    def _one(self, item: FeedItem, stop: threading.Event) -> Outcome:
        decoded = item.decoded
        if decoded.image is None:
            return decoded.source, decoded.reason
        start = time.perf_counter()
        body = png_bytes(decoded.image)  # the pixels read here: a file changed since is not sent half-new
        inspection = self._post(body, f"{item.name}.png", self.key(item), stop)
        if isinstance(inspection, str):
            return decoded.source, inspection
        files: dict[str, bytes] = {}
        if keeps_pictures(self.pictures, inspection["decision"]):
            overlay = self._get(inspection["overlay_url"], stop)
            files.update(overlays=overlay, thumbnails=thumbnail_jpeg(np.asarray(Image.open(io.BytesIO(overlay))), 256))
        if inspection.get("mask_url"):
            files["masks"] = self._get(inspection["mask_url"], stop)
        row = {"score": inspection["score"], "normalised_score": inspection["normalised_score"],
               "decision": inspection["decision"], "threshold": inspection["threshold"],
               "regions": [{k: region[k] for k in ("x", "y", "width", "height", "area", "peak")}
                           for region in inspection["regions"]],
               "model_id": inspection["model_sha256"], "signer": inspection.get("signer"),
               "precision": self.info.get("precision")}
        return Rendered(decoded.source, row, files, decoded.seconds + time.perf_counter() - start)

    def _post(self, body: bytes, filename: str, key: str, stop: threading.Event) -> dict[str, Any] | str:
        """The service's inspection of one image, or why it refused it (a reason of the image's own)."""
        def send() -> httpx.Response:
            return self.http.post(f"/v1/models/{self.model}/inspect", params={"filename": filename}, content=body,
                                  headers={"Content-Type": "image/png", "Idempotency-Key": key})

        answer = self._retrying(send, stop)
        if answer.status_code != 200:
            return _detail(answer)
        inspections = answer.json()["inspections"]
        return inspections[0] if inspections else _detail(answer)

    def _get(self, path: str, stop: threading.Event) -> bytes:
        answer = self._retrying(lambda: self.http.get(path), stop)
        if answer.status_code != 200:
            raise ClipfusionError(f"--server {self.url}: {path} answered {answer.status_code}: {_detail(answer)}")
        return answer.content

    def _retrying(self, call: Any, stop: threading.Event) -> httpx.Response:
        """``call()`` until the service answers something that is not about its own state."""
        failures = 0
        while True:
            try:
                answer = call()
                if answer.status_code not in RETRIED:
                    if failures:
                        logger.warning("%s answers again", self.url)
                    return answer
                reason = f"{answer.status_code} {_detail(answer)}"
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
            delay = float(BACKOFF[min(failures, len(BACKOFF) - 1)])
            (logger.warning if failures == 0 else logger.debug)(
                "%s does not take images (%s): trying again, the image waits", self.url, reason)
            failures += 1
            if stop.wait(delay):
                raise Stopped

    def close(self) -> None:
        self.http.close()


def _detail(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:200]
    return str(body.get("detail") or body.get("code")) if isinstance(body, dict) else str(body)[:200]
