"""``watch --db URL``: each verdict of a watch also recorded in a service's database (the same tables
``serve`` writes), so its history, page and filters see the line's inspections.

It is a sink like MQTT's, behind the watch's durable outbox: a database that is down for a while gets every
inspection, in order, when it is back.  Each row's ``idempotency_key`` is ``watch-<message id>``, so a
message delivered twice records one inspection.  The pictures stay in the watch's ``--out`` (a service on
another machine could not serve them): the service shows these inspections without an overlay.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from clipfusion.errors import ClipfusionError
from clipfusion.publishing.outbox import sink_key
from clipfusion.service.database import make_engine, migrate, session_factory
from clipfusion.service.tables import Inspection, Region


class DatabaseSink:
    """Records messages as inspections of model ``model_name`` in the database at ``url`` (migrated first)."""

    def __init__(self, url: str, model_name: str) -> None:
        try:
            self.engine = make_engine(url)
            migrate(self.engine)
        except (SQLAlchemyError, ValueError) as exc:
            raise ClipfusionError(f"--db: cannot open {url.split('@')[-1]} ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0]}); check the URL and that the database runs") from None
        self.sessions = session_factory(self.engine)
        self.model_name = model_name
        self.name = f"database {self.engine.url.render_as_string(hide_password=True)}"
        self.key = sink_key("db", url)

    def send(self, message: dict[str, Any]) -> None:
        key = f"watch-{message['id']}"
        with self.sessions.begin() as session:
            if session.scalar(select(Inspection.id).where(Inspection.idempotency_key == key)) is not None:
                return  # recorded before its acknowledgement was lost
            session.add(Inspection(
                id=uuid.uuid4().hex, model=self.model_name, model_sha256=message["model"],
                created=datetime.fromisoformat(message["time"]), filename=message["source"][-500:],
                width=message["width"], height=message["height"], score=message["score"],
                normalised_score=message["normalised_score"], decision=message["decision"],
                threshold=message["threshold"], seconds=message.get("seconds") or 0.0, overlay="", mask=None,
                image=None, signer=message.get("signer"), idempotency_key=key,
                regions=[Region(**region) for region in message["regions"]]))

    def close(self) -> None:
        self.engine.dispose()
