"""``serve --publish``: each stored inspection's verdict, as the same ``clipfusion.inspection/1`` message
that ``watch`` sends (its id the inspection's id in the REST API), through a durable outbox per receiver in
``data_dir/outbox``.  An inspection is published after its row is committed; one committed just before a
stop whose message was not yet written is published on the next start (``recover``)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from clipfusion.publishing.message import inspection_message
from clipfusion.publishing.outbox import Outbox
from clipfusion.service.tables import Inspection

logger = logging.getLogger(__name__)
# how far before the last message a restart looks for inspections committed without theirs: the finishing
# threads commit rows out of order within a few seconds
RECOVERY_MARGIN = timedelta(minutes=5)


def inspection_payload(row: Inspection, category: str | None) -> dict[str, Any]:
    """The message of a stored inspection."""
    regions = [{"x": r.x, "y": r.y, "width": r.width, "height": r.height, "area": r.area, "peak": r.peak}
               for r in row.regions]
    created = row.created if row.created.tzinfo else row.created.replace(tzinfo=timezone.utc)  # SQLite drops it
    message = inspection_message(row.id, {"path": row.filename, "model_id": row.model_sha256,
                                          "timestamp": created.isoformat(timespec="milliseconds"),
                                          "decision": row.decision, "score": row.score,
                                          "normalised_score": row.normalised_score, "threshold": row.threshold,
                                          "regions": regions, "width": row.width, "height": row.height}, category)
    return {**message, "model_name": row.model}


class Publisher:
    """The service's outboxes (none without ``--publish``)."""

    def __init__(self, outboxes: Sequence[Outbox]) -> None:
        self.outboxes = list(outboxes)

    def publish(self, row: Inspection, category: str | None) -> None:
        if self.outboxes:
            message = inspection_payload(row, category)
            for outbox in self.outboxes:
                outbox.put(message)

    def recover(self, sessions: sessionmaker[Session], categories: dict[str, str]) -> None:
        """Publish the inspections committed since (shortly before) each outbox's last message that it lacks.
        An outbox that never held a message starts with the inspections to come, not the history."""
        for outbox in self.outboxes:
            if not outbox.messages:
                continue
            known = {message["id"] for message in outbox.messages}
            since = datetime.fromisoformat(outbox.messages[-1]["time"]) - RECOVERY_MARGIN
            with sessions() as session:
                rows = session.scalars(select(Inspection).options(selectinload(Inspection.regions))
                                       .where(Inspection.created >= since).order_by(Inspection.created)).all()
                missing = [row for row in rows if row.id not in known]
                for row in missing:
                    outbox.put(inspection_payload(row, categories.get(row.model)))
            if missing:
                logger.warning("%d inspections committed before the last stop had no message to %s: queued now",
                               len(missing), outbox.sink.name)

    def start(self) -> None:
        for outbox in self.outboxes:
            outbox.start()

    def close(self) -> None:
        for outbox in self.outboxes:
            outbox.close()
