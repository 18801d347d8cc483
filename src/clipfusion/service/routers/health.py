"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from clipfusion.service.dependencies import StateDep
from clipfusion.service.errors import ServiceError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep) -> dict[str, str]:
    """Every model is loaded and the database answers."""
    if not state.ready or state.engine is None:
        raise ServiceError(503, "not_ready", "the models are loading or the service is stopping")
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:  # every driver's connection error arrives wrapped as one
        raise ServiceError(503, "database_unreachable", f"the database does not answer: {type(exc).__name__}") from None
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
