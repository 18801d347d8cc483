"""/v1/models: what is served, and inspecting images with one of them."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from clipfusion.service.batching import QueueFullError, ShuttingDownError
from clipfusion.service.dependencies import SessionDep, StateDep, require_api_key
from clipfusion.service.errors import ServiceError
from clipfusion.service.inspector import NotFiniteError
from clipfusion.service.records import load_inspections
from clipfusion.service.schemas import AuditOut, ChangeOut, ErrorOut, InspectOut, ModelOut, VersionOut
from clipfusion.service.tables import Audit, ModelVersion
from clipfusion.service.uploads import read_uploads

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])
ERRORS: dict[int | str, dict[str, object]] = {status: {"model": ErrorOut} for status in (401, 404, 413, 415, 422, 503)}


@router.get("", response_model=list[ModelOut])
def list_models(state: StateDep) -> list[ModelOut]:
    out = []
    for name, model in state.models.items():
        thresholds, card = model.card.thresholds, model.card
        batcher = state.batchers.get(name)
        out.append(ModelOut(name=name, category=model.category, preset=model.model.preset,
                            image_threshold=thresholds.image, pixel_threshold=thresholds.pixel,
                            bank_size=model.bank_size, version=card.version, precision=str(model.inspector.precision),
                            thresholds_precision=card.dtype, signer=model.model.signer, sha256=model.sha256,
                            created=card.created, queue_depth=0 if batcher is None else batcher.depth))
    return out


@router.post("/{name}/inspect", response_model=InspectOut, responses=ERRORS)
async def inspect(name: str, request: Request, state: StateDep) -> InspectOut:
    """Score one or more images: multipart files (any field name), or one raw image body
    (``Content-Type: image/...``, file name in ``?filename=``)."""
    state.model(name)  # 404 before reading the upload
    uploads = await read_uploads(request, state.settings)
    try:
        outcomes = await state.batchers[name].submit_many(uploads)
    except QueueFullError:
        raise ServiceError(503, "queue_full", f"model {name} has {state.settings.max_queue} images waiting; retry "
                                              "shortly", headers={"Retry-After": "1"}) from None
    except ShuttingDownError:
        raise ServiceError(503, "shutting_down", "the service is stopping", headers={"Retry-After": "5"}) from None
    failed = [str(outcome) for outcome in outcomes if isinstance(outcome, NotFiniteError)]
    ids = [str(outcome) for outcome in outcomes if not isinstance(outcome, NotFiniteError)]

    def fetch() -> InspectOut:
        assert state.sessions is not None
        session: Session
        with state.sessions() as session:
            return InspectOut(inspections=load_inspections(session, ids))

    answer = await run_in_threadpool(fetch)
    for inspection in answer.inspections:
        state.metrics.decisions.labels(name, inspection.decision).inc()
    if failed:
        raise ServiceError(422, "not_finite", "; ".join(failed))
    return answer


@router.post("/{name}/rollback", response_model=ChangeOut, responses=ERRORS)
async def rollback(name: str, state: StateDep) -> ChangeOut:
    """Serve the version the active one was learned from (undo the last learning step)."""
    return await state.rollback(name)


@router.get("/{name}/versions", response_model=list[VersionOut], responses=ERRORS)
def versions(name: str, state: StateDep, session: SessionDep) -> list[VersionOut]:
    """Every version of the model file this service has served, newest first."""
    state.model(name)
    rows = session.scalars(select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.id.desc()))
    return [VersionOut(id=v.id, sha256=v.sha256, path=v.path, created=v.created, active=v.active,
                       parent_id=v.parent_id) for v in rows]


@router.get("/{name}/audit", response_model=list[AuditOut], responses=ERRORS)
def audit(name: str, state: StateDep, session: SessionDep) -> list[AuditOut]:
    """Every change the service made to the model, newest first."""
    state.model(name)
    rows = session.scalars(select(Audit).where(Audit.model == name).order_by(Audit.id.desc()))
    return [AuditOut(id=a.id, created=a.created, action=a.action, model=a.model, detail=json.loads(a.detail))
            for a in rows]
