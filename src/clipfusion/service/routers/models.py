"""/v1/models: what is served, and inspecting images with one of them."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from clipfusion.service.batching import QueueFullError, ShuttingDownError
from clipfusion.service.dependencies import StateDep, require_api_key
from clipfusion.service.errors import ServiceError
from clipfusion.service.inspector import NotFiniteError
from clipfusion.service.records import load_inspections
from clipfusion.service.schemas import ErrorOut, InspectOut, ModelOut
from clipfusion.service.uploads import read_uploads

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])
ERRORS: dict[int | str, dict[str, object]] = {status: {"model": ErrorOut} for status in (401, 404, 413, 415, 422, 503)}


@router.get("", response_model=list[ModelOut])
def list_models(state: StateDep) -> list[ModelOut]:
    out = []
    for name, model in state.models.items():
        thresholds, card = model.detector.thresholds_, model.card
        batcher = state.batchers.get(name)
        out.append(ModelOut(name=name, category=model.category, preset=str(model.detector.preset),
                            image_threshold=thresholds.image, pixel_threshold=thresholds.pixel,
                            bank_size=model.bank_size, version=card.version, sha256=model.sha256,
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
