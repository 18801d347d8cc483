"""The FastAPI application: lifespan (database, models, batchers), routers, errors, metrics."""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from clipfusion import __version__
from clipfusion.service import errors
from clipfusion.service.logs import REQUEST_ID, log_access
from clipfusion.service.routers import docs, health, inspections, models, page
from clipfusion.service.settings import ServiceSettings
from clipfusion.service.state import ServiceState

SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # an X-Request-ID taken as given: safe in logs and headers
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # answered as usual while the service drains


async def _prune_hourly(state: ServiceState) -> None:
    """--keep-days: old stored uploads are deleted at start and then every hour."""
    while True:
        await run_in_threadpool(state.prune_images)
        await asyncio.sleep(3600)


async def _refuse_while_draining(request: Request, state: ServiceState) -> Response:
    """503 ``shutting_down`` for a request that arrives while the service drains.  Its body is read away
    first (within the upload limit and read timeout), so that closing the connection after the answer
    resets nothing the client is still sending; a body that is not read keeps the connection open (uvicorn
    reads it away) until the service stops."""
    declared = request.headers.get("content-length", "0")
    read = declared.isdigit() and int(declared) <= state.settings.max_upload_bytes
    if read:
        try:
            await asyncio.wait_for(request.body(), state.settings.read_timeout)
        except (asyncio.TimeoutError, ClientDisconnect):
            read = False
    return errors.answer(request, 503, "shutting_down", "the service is stopping; retry shortly (or on another "
                                                        "instance)",
                         headers={"Retry-After": "5", **({"Connection": "close"} if read else {})})


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service for ``settings``; models load and the database migrates when it starts."""
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(state.open)
        state.start_batchers()
        pruning = asyncio.get_running_loop().create_task(_prune_hourly(state))
        yield
        pruning.cancel()
        await state.close()

    # FastAPI's own /docs loads its scripts from a CDN and /openapi.json is open to all: both off, and
    # with --docs served from the package, behind the key (routers/docs.py)
    app = FastAPI(title="clipfusion inspection service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  description="Zero-/few-shot visual anomaly inspection (CLIPFusion). Errors are JSON "
                              "{code, detail, request_id}.")
    app.state.service = state
    errors.install(app)
    for router in (health.router, models.router, inspections.router, page.router):
        app.include_router(router)
    page.mount_static(app)
    if settings.docs:
        docs.install(app)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Give the request its id (``X-Request-ID``, accepted when sane, else new), answer an unexpected
        failure as JSON, and count every answer by status."""
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        REQUEST_ID.set(request.state.request_id)
        start = time.perf_counter()
        if request.url.path not in PROBES:
            state.last_arrival = time.monotonic()
        if state.draining and request.url.path not in PROBES:
            response = await _refuse_while_draining(request, state)
        else:
            state.in_flight += 1
            try:
                response = await call_next(request)
            except Exception as error:  # anything the handlers did not turn into an answer: a 500, counted
                response = errors.internal_error(request, error)
            finally:
                state.in_flight -= 1
            if state.draining:  # answered during the drain: the client reconnects (elsewhere) next time
                response.headers["Connection"] = "close"
        response.headers.setdefault("X-Request-ID", request.state.request_id)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        state.metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        seconds = time.perf_counter() - start
        state.metrics.latency.labels(route).observe(seconds)
        log_access(request.method, request.url.path, response.status_code, seconds * 1000,
                   getattr(request.state, "actor", ""))
        return response

    return app
