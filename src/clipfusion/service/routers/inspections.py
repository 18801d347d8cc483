"""/v1/inspections: history, one inspection, its overlay and mask, and operators' feedback."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from clipfusion.service.dependencies import SessionDep, StateDep, require_api_key
from clipfusion.service.errors import ServiceError
from clipfusion.service.records import history, load_inspections
from clipfusion.service.schemas import ErrorOut, FeedbackIn, FeedbackOut, InspectionOut, InspectionPage
from clipfusion.service.tables import Feedback, Inspection

router = APIRouter(prefix="/v1/inspections", tags=["inspections"], dependencies=[Depends(require_api_key)])
ERRORS: dict[int | str, dict[str, object]] = {status: {"model": ErrorOut} for status in (401, 404, 422)}


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
async def post_feedback(identifier: str, body: FeedbackIn, state: StateDep, response: Response) -> FeedbackOut:
    """Record an operator's verdict on an inspection.  With ``--learn``, ``normal`` on an NG inspection
    (a false alarm) adds its image to the model's memory bank as a new model version.  Idempotent: the
    same verdict on the same inspection again (a double click, a retried request) is answered 200 with
    the first record and learns nothing more; a verdict whose learning fails is not kept."""
    def record() -> tuple[FeedbackOut, str, str, bool]:
        assert state.sessions is not None
        with state.sessions.begin() as session:
            inspection = _inspection(session, identifier)
            earlier = session.scalars(select(Feedback).where(Feedback.inspection_id == inspection.id,
                                                             Feedback.label == body.label)).first()
            entry = earlier or Feedback(inspection_id=inspection.id, label=body.label, note=body.note,
                                        created=datetime.now(timezone.utc))
            session.add(entry)
            session.flush()
            return (FeedbackOut(id=entry.id, label=body.label, note=entry.note, created=entry.created),
                    inspection.model, inspection.decision, earlier is None)

    def forget(feedback_id: int) -> None:
        assert state.sessions is not None
        with state.sessions.begin() as session:
            session.execute(delete(Feedback).where(Feedback.id == feedback_id))

    answer, model, decision, new = await run_in_threadpool(record)
    if not new:
        response.status_code = 200
        return answer
    if state.settings.learn and body.label == "normal" and decision == "NG" and model in state.models:
        try:
            answer.learned = await state.learn(model, identifier)
        except ServiceError:  # nothing was learned: the verdict is not kept either, and can be given again
            await run_in_threadpool(forget, answer.id)
            raise
    return answer
