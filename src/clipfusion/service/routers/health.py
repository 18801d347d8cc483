"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

import shutil

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from clipfusion.errors import ClipfusionError
from clipfusion.outputs import probe_writable
from clipfusion.service.dependencies import StateDep
from clipfusion.service.errors import ServiceError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep) -> dict[str, str]:
    """Every model is loaded, the database answers, and the data folder can be written with room to spare."""
    if not state.ready or state.draining or state.engine is None:
        raise ServiceError(503, "not_ready", "the models are loading or the service is stopping")
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:  # every driver's connection error arrives wrapped as one
        raise ServiceError(503, "database_unreachable", f"the database does not answer: {type(exc).__name__}") from None
    free_mb = shutil.disk_usage(state.settings.data_dir).free / 2**20
    if free_mb < state.settings.min_free_mb:
        raise ServiceError(503, "disk_low", f"{free_mb:.0f} MB free where the inspections are kept, below "
                                            f"--min-free-mb {state.settings.min_free_mb}")
    try:
        probe_writable(state.settings.data_dir, "--data")
    except ClipfusionError:
        raise ServiceError(503, "data_not_writable", "the inspections' folder cannot be written") from None
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
