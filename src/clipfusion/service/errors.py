"""Every error answer is JSON ``{"code", "detail", "request_id"}`` with a stable code (see
``schemas.ErrorOut``): the API's own errors, the framework's (404, 405, validation) and any unexpected
failure (500 ``internal_error``: its text and traceback go to the log under the request id, never into
the answer, which must not leak paths or internals)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
              415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}


def request_id(request: Request) -> str:
    """The id the request carries (``X-Request-ID``, or the one given to it on arrival)."""
    return str(getattr(request.state, "request_id", ""))


def answer(request: Request, status: int, code: str, detail: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    """The JSON error answer, with the request id in the body and the ``X-Request-ID`` header."""
    identifier = request_id(request)
    return JSONResponse({"code": code, "detail": detail, "request_id": identifier}, status_code=status,
                        headers={**(headers or {}), "X-Request-ID": identifier})


def internal_error(request: Request, error: BaseException) -> JSONResponse:
    """An unexpected failure: logged with its traceback under the request id, answered without it."""
    logger.error("request %s (%s %s) failed", request_id(request), request.method, request.url.path,
                 exc_info=error)
    return answer(request, 500, "internal_error", f"the service failed on this request; its log names the cause "
                                                  f"under request id {request_id(request)}")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into ``{"code", "detail", "request_id"}``."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return answer(request, error.status, error.code, error.detail, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return answer(request, error.status_code, HTTP_CODES.get(error.status_code, "error"), str(error.detail),
                      dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return answer(request, 422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")
