"""OPC UA (asyncua): clipfusion runs its own OPC UA server, which a PLC or SCADA reads.

``--publish opc.tcp://HOST:PORT/PATH`` starts it on that endpoint.  Under ``Objects/clipfusion`` it shows
``Heartbeat`` (the server's time, written every second: a reader that sees it stop knows the inspection
is down) and one folder per model (named as ``serve`` names it, or by its category under ``watch``) with
the last verdict —
``LastDecision`` (OK/NG), ``LastScore``, ``LastNormalisedScore``, ``LastThreshold``, ``LastInspectionId``,
``LastSource``, ``LastTime`` — and ``OkCount``/``NgCount`` since the server started.  Node ids are strings
that do not change between runs, ``ns=<urn:clipfusion>;s=clipfusion.<model>.<Name>``, so a PLC program can
address them directly.  A message delivered twice (same id) is counted once.

Security: ``?security=Basic256Sha256_SignAndEncrypt`` (comma-separated asyncua policy names; default
``NoSecurity``, for a closed cell network) with ``&certificate=PATH&private_key=PATH`` (PEM or DER: the
server's own certificate).
"""
from __future__ import annotations

import logging
import math
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from clipfusion.errors import ClipfusionError
from clipfusion.publishing.outbox import sink_key

logger = logging.getLogger(__name__)
NAMESPACE = "urn:clipfusion"
HEARTBEAT_SECONDS = 1.0
# variable → (OPC UA type name, message field)
VERDICT = {"LastDecision": ("String", "decision"), "LastScore": ("Double", "score"),
           "LastNormalisedScore": ("Double", "normalised_score"), "LastThreshold": ("Double", "threshold"),
           "LastInspectionId": ("String", "id"), "LastSource": ("String", "source"), "LastTime": ("String", "time")}


class OpcUaSink:
    """An OPC UA server on ``url`` whose variables each delivered verdict updates (see the module)."""

    def __init__(self, url: str) -> None:
        try:
            from asyncua import ua
            from asyncua.sync import Server, ThreadLoop
        except ImportError:
            raise ClipfusionError("--publish opc.tcp:// needs asyncua: pip install 'clipfusion[line]'") from None
        parts = urlsplit(url)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ClipfusionError(f"--publish {url}: write opc.tcp://HOST:PORT/PATH (the endpoint clipfusion serves)")
        query = parse_qs(parts.query)
        endpoint = urlunsplit(parts._replace(query=""))
        self.name, self.key, self.ua = f"OPC UA {endpoint}", sink_key("opcua", endpoint), ua
        policies = [name.strip() for text in query.get("security", ["NoSecurity"]) for name in text.split(",")]
        unknown = [name for name in policies if not hasattr(ua.SecurityPolicyType, name)]
        if unknown:
            raise ClipfusionError(f"--publish {url}: unknown security policy {unknown[0]}; use NoSecurity or e.g. "
                                  "Basic256Sha256_SignAndEncrypt")
        secured = [name for name in policies if name != "NoSecurity"]
        certificate, key = query.get("certificate", [None])[0], query.get("private_key", [None])[0]
        if secured and not (certificate and key):
            raise ClipfusionError(f"--publish {url}: security {secured[0]} needs the server's own certificate: add "
                                  "&certificate=PATH&private_key=PATH")
        for path in (certificate, key):
            if path and not Path(path).is_file():
                raise ClipfusionError(f"--publish: {path} is not a file (the OPC UA server's certificate or key)")
        # asyncua warns, per connection, of what NoSecurity means; the endpoint's policy is said once, below
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        # a daemon loop thread: a process that fails after this (a model that does not load) still exits
        self.loop = ThreadLoop()
        self.loop.daemon = True
        self.loop.start()
        self.server = Server(tloop=self.loop)
        self.server.set_endpoint(endpoint)
        self.server.set_server_name("clipfusion")
        self.server.set_security_policy([getattr(ua.SecurityPolicyType, name) for name in policies])
        if certificate and key:
            self.server.load_certificate(certificate)
            self.server.load_private_key(key)
        self.index = self.server.register_namespace(NAMESPACE)
        self.root = self.server.nodes.objects.add_folder(self._id("clipfusion"), "clipfusion")
        self.heartbeat = self.root.add_variable(self._id("clipfusion.Heartbeat"), "Heartbeat", _now())
        self.models: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()
        try:
            self.server.start()
        except OSError as exc:
            self.loop.stop()
            raise ClipfusionError(f"--publish {endpoint}: cannot listen there ({exc.strerror or exc}); choose another "
                                  "port") from None
        self._stop = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="opcua-heartbeat", daemon=True)
        self._beating.start()
        logger.info("OPC UA server on %s (security: %s)", endpoint, ", ".join(policies))

    def _id(self, name: str) -> Any:
        return self.ua.NodeId(self.ua.String(name), self.index)

    def _variant(self, value: Any, kind: str) -> Any:
        """``value`` as an OPC UA ``kind`` (String, Double); none yet: an empty string, or NaN."""
        if value is None:
            value = "" if kind == "String" else math.nan
        return self.ua.Variant(value, getattr(self.ua.VariantType, kind))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.heartbeat.write_value(_now())

    def _model(self, name: str) -> dict[str, Any]:
        """The variables of model ``name``, created on its first verdict."""
        if name not in self.models:
            folder = self.root.add_folder(self._id(f"clipfusion.{name}"), name)
            nodes = {variable: folder.add_variable(self._id(f"clipfusion.{name}.{variable}"), variable,
                                                   self._variant(None, kind))
                     for variable, (kind, _) in VERDICT.items()}
            for counter in ("OkCount", "NgCount"):
                nodes[counter] = folder.add_variable(self._id(f"clipfusion.{name}.{counter}"), counter,
                                                     self.ua.Variant(0, self.ua.VariantType.UInt64))
            self.models[name] = {"nodes": nodes, "OK": 0, "NG": 0}
        return self.models[name]

    def send(self, message: dict[str, Any]) -> None:
        model = self._model(str(message.get("model_name") or message.get("category") or
                                str(message.get("model") or "model")[:12]))
        ua, nodes = self.ua, model["nodes"]
        for variable, (kind, field) in VERDICT.items():
            nodes[variable].write_value(ua.DataValue(self._variant(message.get(field), kind)))
        decision = message.get("decision")
        if message["id"] not in self.seen and decision in ("OK", "NG"):
            self.seen.add(message["id"])
            model[decision] += 1
            counter = "OkCount" if decision == "OK" else "NgCount"
            nodes[counter].write_value(ua.DataValue(ua.Variant(model[decision], ua.VariantType.UInt64)))

    def close(self) -> None:
        self._stop.set()
        self.server.stop()
        self.loop.stop()


def _now() -> datetime:
    return datetime.now(timezone.utc)
