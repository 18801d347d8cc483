"""Inspections as the API shows them: ORM rows → response models, and the history query."""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, selectinload

from clipfusion.service.schemas import FeedbackOut, InspectionOut, RegionOut
from clipfusion.service.tables import Feedback, Inspection


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time the service stores is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def to_out(inspection: Inspection) -> InspectionOut:
    base = f"/v1/inspections/{inspection.id}"
    return InspectionOut(
        id=inspection.id, model=inspection.model, model_sha256=inspection.model_sha256,
        created=_utc(inspection.created),
        filename=inspection.filename, width=inspection.width, height=inspection.height, score=inspection.score,
        normalised_score=inspection.normalised_score, decision=inspection.decision, threshold=inspection.threshold,
        seconds=inspection.seconds,
        regions=[RegionOut(x=r.x, y=r.y, width=r.width, height=r.height, area=r.area, peak=r.peak)
                 for r in inspection.regions],
        overlay_url=f"{base}/overlay.png", mask_url=f"{base}/mask.png" if inspection.mask else None,
        signer=inspection.signer,
        feedback=[FeedbackOut(id=f.id, label=f.label, note=f.note, created=_utc(f.created), actor=f.actor)  # type: ignore[arg-type]
                  for f in inspection.feedback])


def _loaded() -> Select[Inspection]:
    return select(Inspection).options(selectinload(Inspection.regions), selectinload(Inspection.feedback))


def load_inspections(session: Session, ids: Sequence[str]) -> list[InspectionOut]:
    """The inspections ``ids``, in that order."""
    found = {i.id: i for i in session.scalars(_loaded().where(Inspection.id.in_(list(ids))))}
    return [to_out(found[i]) for i in ids]


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC, as the rows are stored (a time without an offset is taken as UTC): SQLite compares
    the stored text, so a ``+02:00`` bound must become UTC first."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def history(session: Session, model: str | None, decision: str | None, since: datetime | None,
            until: datetime | None, feedback: str | None, limit: int, offset: int) -> tuple[list[InspectionOut], int]:
    """Inspections matching every given filter, newest first: (one page, total count)."""
    query = select(Inspection.id)
    if model:
        query = query.where(Inspection.model == model)
    if decision:
        query = query.where(Inspection.decision == decision)
    if since:
        query = query.where(Inspection.created >= as_utc(since))
    if until:
        query = query.where(Inspection.created < as_utc(until))
    with_feedback = select(Feedback.inspection_id)
    if feedback == "none":
        query = query.where(Inspection.id.not_in(with_feedback))
    elif feedback == "any":
        query = query.where(Inspection.id.in_(with_feedback))
    elif feedback in ("normal", "anomalous"):
        query = query.where(Inspection.id.in_(with_feedback.where(Feedback.label == feedback)))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    ids = list(session.scalars(query.order_by(Inspection.created.desc(), Inspection.id).limit(limit).offset(offset)))
    return load_inspections(session, ids), total
