"""/v1/inspections: history, one inspection, its overlay and mask, and operators' feedback."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from clipfusion.service.dependencies import ActorDep, AdminDep, SessionDep, StateDep, require_api_key
from clipfusion.service.errors import ServiceError
from clipfusion.service.publisher import inspection_payload
from clipfusion.service.records import history, load_inspections
from clipfusion.service.schemas import (
    ChangeOut,
    ErrorOut,
    FeedbackIn,
    FeedbackOut,
    InspectionOut,
    InspectionPage,
    MessageOut,
)
from clipfusion.service.tables import Audit, Feedback, Inspection

router = APIRouter(prefix="/v1/inspections", tags=["inspections"], dependencies=[Depends(require_api_key)])
ERRORS: dict[int | str, dict[str, object]] = {status: {"model": ErrorOut} for status in (401, 403, 404, 409, 422)}


def _inspection(session: Session, identifier: str) -> Inspection:
    inspection = session.get(Inspection, identifier)
    if inspection is None:
        raise ServiceError(404, "unknown_inspection", f"no inspection {identifier!r}")
    return inspection


@router.get("", response_model=InspectionPage, responses=ERRORS)
def list_inspections(session: SessionDep, model: str | None = None,
                     decision: Literal["OK", "NG"] | None = None, since: datetime | None = None,
                     until: datetime | None = None,
                     feedback: Literal["any", "none", "normal", "anomalous"] | None = None,
                     limit: Annotated[int, Query(ge=1, le=500)] = 50,
                     offset: Annotated[int, Query(ge=0)] = 0) -> InspectionPage:
    """Newest first; every filter optional."""
    items, total = history(session, model, decision, since, until, feedback, limit, offset)
    return InspectionPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{identifier}", response_model=InspectionOut, responses=ERRORS)
def get_inspection(identifier: str, session: SessionDep) -> InspectionOut:
    _inspection(session, identifier)
    return load_inspections(session, [identifier])[0]


@router.get("/{identifier}/message", response_model=MessageOut, response_model_by_alias=True, responses=ERRORS)
def message(identifier: str, session: SessionDep, state: StateDep) -> MessageOut:
    """The inspection as the ``clipfusion.inspection/1`` message that ``--publish`` sends."""
    inspection = _inspection(session, identifier)
    served = state.models.get(inspection.model)
    return MessageOut.model_validate(inspection_payload(inspection, served.category if served else None))


@router.get("/{identifier}/overlay.png", response_class=FileResponse, responses=ERRORS)
def overlay(identifier: str, session: SessionDep,
            state: StateDep) -> FileResponse:
    inspection = _inspection(session, identifier)
    if not inspection.overlay:
        raise ServiceError(404, "pruned", f"inspection {identifier}'s files were deleted after --keep-days")
    return FileResponse(state.settings.data_dir / "files" / inspection.overlay, media_type="image/png")


@router.get("/{identifier}/mask.png", response_class=FileResponse, responses=ERRORS)
def mask(identifier: str, session: SessionDep,
         state: StateDep) -> FileResponse:
    inspection = _inspection(session, identifier)
    if inspection.mask is None:
        raise ServiceError(404, "no_mask", f"inspection {identifier} is {inspection.decision}: masks are written "
                                           "for NG images only")
    return FileResponse(state.settings.data_dir / "files" / inspection.mask, media_type="image/png")


@router.post("/{identifier}/feedback", response_model=FeedbackOut, status_code=201, responses=ERRORS)
async def post_feedback(identifier: str, body: FeedbackIn, state: StateDep, actor: ActorDep,
                        response: Response) -> FeedbackOut:
    """Record an operator's verdict on an inspection.  With ``--learn``, ``normal`` on an NG inspection
    (a false alarm) given with an admin key (or with no keys configured) adds its image to the model's
    memory bank as a new model version; given with an operator key it is recorded, and an admin learns
    from it with ``POST /v1/inspections/ID/learn``.  Idempotent: the same verdict on the same inspection
    again (a double click, a retried request) is answered 200 with the first record and learns nothing
    more; a verdict whose learning fails is not kept."""
    def record() -> tuple[FeedbackOut, str, str, bool]:
        assert state.sessions is not None
        with state.sessions.begin() as session:
            inspection = _inspection(session, identifier)
            earlier = session.scalars(select(Feedback).where(Feedback.inspection_id == inspection.id,
                                                             Feedback.label == body.label)).first()
            entry = earlier or Feedback(inspection_id=inspection.id, label=body.label, note=body.note,
                                        created=datetime.now(timezone.utc), actor=actor.name or None)
            session.add(entry)
            session.flush()
            return (FeedbackOut(id=entry.id, label=body.label, note=entry.note, created=entry.created,
                                actor=entry.actor), inspection.model, inspection.decision, earlier is None)

    def forget(feedback_id: int) -> None:
        assert state.sessions is not None
        with state.sessions.begin() as session:
            session.execute(delete(Feedback).where(Feedback.id == feedback_id))

    answer, model, decision, new = await run_in_threadpool(record)
    if not new:
        response.status_code = 200
        return answer
    if state.settings.learn and body.label == "normal" and decision == "NG" and model in state.models:
        if actor.role != "admin":
            answer.learning = (f"recorded; key {actor.name!r} is an operator key, so an admin learns from it: "
                               f"POST /v1/inspections/{identifier}/learn")
            return answer
        try:
            answer.learned = await state.learn(model, identifier, actor.name)
        except ServiceError:  # nothing was learned: the verdict is not kept either, and can be given again
            await run_in_threadpool(forget, answer.id)
            raise
    return answer


@router.delete("/{identifier}/feedback/{feedback_id}", status_code=204, responses=ERRORS)
def undo_feedback(identifier: str, feedback_id: int, session: SessionDep) -> Response:
    """Take back a verdict (the operator page's undo).  A false alarm already learned from is not taken
    back here: its model version stays until an admin rolls it back (409 ``learned``)."""
    entry = session.get(Feedback, feedback_id)
    if entry is None or entry.inspection_id != identifier:
        raise ServiceError(404, "unknown_feedback", f"inspection {identifier} has no feedback {feedback_id}")
    # learning's audit row names the inspection (learning._audit writes its detail with json.dumps)
    learned = session.scalars(select(Audit.id).where(Audit.action == "learn", Audit.detail.contains(
        json.dumps({"inspection": identifier})[1:-1]))).first()
    if entry.label == "normal" and learned is not None:
        raise ServiceError(409, "learned", f"the model learned from inspection {identifier}; an admin rolls the model "
                                           "back to undo it")
    session.delete(entry)
    session.commit()
    return Response(status_code=204)


@router.post("/{identifier}/learn", response_model=ChangeOut, responses=ERRORS)
async def learn(identifier: str, state: StateDep, admin: AdminDep) -> ChangeOut:
    """An admin confirms a false alarm recorded by an operator: the inspection (NG, with ``normal``
    feedback) joins its model's memory bank as a new model version.  409 ``already_learned`` when it is
    in the bank already."""
    if not state.settings.learn:
        raise ServiceError(409, "learning_off", "the service was started without --learn: models do not change")

    def check() -> str:
        assert state.sessions is not None
        with state.sessions() as session:
            inspection = _inspection(session, identifier)
            confirmed = session.scalars(select(Feedback).where(Feedback.inspection_id == inspection.id,
                                                               Feedback.label == "normal")).first()
            if inspection.decision != "NG" or confirmed is None:
                raise ServiceError(409, "not_a_false_alarm",
                                   f"inspection {identifier} is {inspection.decision} with no 'normal' feedback: only "
                                   "a false alarm an operator marked normal is learned from")
            return inspection.model

    model = await run_in_threadpool(check)
    state.model(model)
    return await state.learn(model, identifier, admin.name)
