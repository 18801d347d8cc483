"""/v1/models: what is served, and inspecting images with one of them."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from clipfusion.service.batching import QueueFullError, ShuttingDownError
from clipfusion.service.dependencies import AdminDep, SessionDep, StateDep, require_api_key
from clipfusion.service.errors import ServiceError, request_id
from clipfusion.service.inspector import Pending
from clipfusion.service.records import load_inspections
from clipfusion.service.schemas import (
    AuditOut,
    ChangeOut,
    DriftOut,
    ErrorOut,
    FailedOut,
    InspectOut,
    ModelHealthOut,
    ModelOut,
    SelfCheckOut,
    VersionOut,
)
from clipfusion.service.state import ServiceState
from clipfusion.service.tables import Audit, Inspection, ModelVersion
from clipfusion.service.uploads import ItemError, Upload, decode, measure, read_files

MAX_KEY_LENGTH = 180  # room for "/N" in the column's 200 characters
router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])
ERRORS: dict[int | str, dict[str, object]] = {status: {"model": ErrorOut}
                                              for status in (401, 403, 404, 409, 413, 415, 422, 503)}


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
    (``Content-Type: image/...``, file name in ``?filename=``).  Each image is inspected or refused on its
    own: 200 with ``failed`` listing those refused, an error status only when none is inspected.

    ``Idempotency-Key``: a request sent again with the key of one that was inspected (its answer lost on
    the way) gets that request's inspections, not new ones."""
    state.model(name)  # 404 before reading the upload
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise ServiceError(400, "bad_request", f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
        earlier = await run_in_threadpool(_inspected_with, state, key)
        if earlier is not None:
            return earlier
    batcher = state.batchers[name]
    if batcher.depth >= state.settings.max_queue:  # before the body is read (uvicorn reads it away) or decoded
        raise _queue_full(name, state)
    received = time.perf_counter()
    files = await read_files(request, state.settings)
    await run_in_threadpool(measure, files, state.settings)
    with state.pixels.hold(sum(item.pixels for item in files)):
        decoded = await run_in_threadpool(decode, files, state.settings, received, request_id(request))
        if key is not None:
            for index, item in enumerate(decoded):
                if isinstance(item, Upload):
                    item.idempotency_key = key if len(decoded) == 1 else f"{key}/{index}"
        uploads = [item for item in decoded if isinstance(item, Upload)]
        try:
            results = await asyncio.wait_for(_score_and_finish(state, name, uploads), state.settings.deadline) \
                if uploads else []
        except asyncio.TimeoutError:  # its images still queued are dropped; a batch already running is recorded
            raise ServiceError(504, "deadline_exceeded", f"the inspection took longer than {state.settings.deadline:g} "
                                                         "s (--deadline); images it finished are in the history",
                               headers={"Retry-After": "5"}) from None
        except QueueFullError:
            raise _queue_full(name, state) from None
        except ShuttingDownError:
            raise ServiceError(503, "shutting_down", "the service is stopping", headers={"Retry-After": "5"}) from None
    by_upload = iter(results)
    outcomes = [item if isinstance(item, ItemError) else next(by_upload) for item in decoded]
    failed = [FailedOut(index=index, filename=outcome.filename, code=outcome.code, detail=outcome.detail)
              for index, outcome in enumerate(outcomes) if isinstance(outcome, ItemError)]
    ids = [outcome for outcome in outcomes if isinstance(outcome, str)]
    if not ids:  # nothing inspected: the request fails with its first image's reason
        first = next(outcome for outcome in outcomes if isinstance(outcome, ItemError))
        raise ServiceError(first.status, first.code, "; ".join(f.detail for f in failed))

    def fetch() -> InspectOut:
        assert state.sessions is not None
        session: Session
        with state.sessions() as session:
            return InspectOut(inspections=load_inspections(session, ids), failed=failed)

    answer = await run_in_threadpool(fetch)
    for inspection in answer.inspections:
        state.metrics.decisions.labels(name, inspection.decision).inc()
    return answer


def _inspected_with(state: ServiceState, key: str) -> InspectOut | None:
    """The answer to an earlier request with Idempotency-Key ``key`` (its images' inspections), or None."""
    assert state.sessions is not None
    session: Session
    with state.sessions() as session:
        found = session.execute(select(Inspection.id, Inspection.idempotency_key).where(
            (Inspection.idempotency_key == key) | Inspection.idempotency_key.startswith(f"{key}/", autoescape=True)))
        # in the order of the request's images: KEY alone, or KEY/0, KEY/1, ... KEY/10 (numbers, not text)
        ids = [identifier for identifier, _ in sorted(found, key=lambda row: _image_index(str(row[1]), key))]
        return InspectOut(inspections=load_inspections(session, ids), failed=[]) if ids else None


def _image_index(stored: str, key: str) -> int:
    """The image's position in its request from its stored key (``KEY``: the only one)."""
    return 0 if stored == key else int(stored[len(key) + 1:])


async def _score_and_finish(state: ServiceState, name: str, uploads: list[Upload]) -> list[str | ItemError]:
    """The model pass in the model's batches (small images finished there too), then each large image
    decided and stored in the finishing threads (at its own size: it does not hold up the model's next
    batch)."""
    model, loop = state.models[name], asyncio.get_running_loop()
    scored = await state.batchers[name].submit_many(uploads)

    async def finished(upload: Upload, result: str | ItemError | Pending) -> str | ItemError:
        if not isinstance(result, Pending):
            return result
        return await loop.run_in_executor(state.finishers, model.finish, upload, result.version, result.scored)

    return list(await asyncio.gather(*(finished(upload, result)
                                       for upload, result in zip(uploads, scored, strict=True))))


def _queue_full(name: str, state: ServiceState) -> ServiceError:
    return ServiceError(503, "queue_full", f"model {name} has {state.settings.max_queue} images waiting; retry "
                                           "shortly", headers={"Retry-After": "1"})


@router.post("/{name}/rollback", response_model=ChangeOut, responses=ERRORS)
async def rollback(name: str, state: StateDep, admin: AdminDep) -> ChangeOut:
    """Serve the version the active one was learned from (undo the last learning step); an admin key."""
    return await state.rollback(name, admin.name)


@router.get("/{name}/health", response_model=ModelHealthOut, responses=ERRORS)
def health(name: str, state: StateDep) -> ModelHealthOut:
    """Can the model's verdicts be trusted? The self-check at load (its fingerprint) and the score drift of
    the version served (docs/reliability.md)."""
    model = state.model(name)
    with model.drift_lock:
        drift = model.drift.state().as_dict()
    check = model.check
    return ModelHealthOut(
        name=name, sha256=model.sha256, drift=DriftOut.model_validate(drift),
        self_check=None if check is None else SelfCheckOut(
            verdict=check.verdict, largest_difference=check.largest, tolerance=check.tolerance,
            causes=[f"{f.what}: {f.recorded} -> {f.here}" for f in check.causes]))


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
    return [AuditOut(id=a.id, created=a.created, action=a.action, model=a.model, detail=json.loads(a.detail),
                     actor=a.actor) for a in rows]
