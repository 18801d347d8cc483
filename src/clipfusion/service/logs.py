"""The service's log: lines for a terminal (``--log-format text``) or one JSON object per line
(``--log-format json``, python-json-logger) for a log collector.  Every line written while a request is
handled carries its request id (the ``X-Request-ID`` it came with, or the one it was given), and each
request ends with one access line: method, path, status, milliseconds and the acting key's name."""
from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

# the request being handled in this task (and the threads it hands work to with run_in_threadpool)
REQUEST_ID: ContextVar[str] = ContextVar("clipfusion_request_id", default="")
access = logging.getLogger("clipfusion.access")


class RequestContext(logging.Filter):
    """Gives each record the request id of the request it was logged for ("" outside requests), unless
    the record names one itself (``extra={"request_id": ...}``: work done for it in a batch thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        return True


def log_config(log_format: LogFormat, quiet: bool) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` for uvicorn's and clipfusion's loggers (uvicorn's ``log_config``)."""
    formatters: dict[str, dict[str, Any]] = {
        "text": {"format": "clipfusion: %(levelname)s: %(message)s"},
        "json": {"()": "pythonjsonlogger.json.JsonFormatter",
                 "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                 "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"}},
    }
    level = "WARNING" if quiet else "INFO"
    handler = {"handlers": ["stderr"], "level": level, "propagate": False}
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"request": {"()": RequestContext}},
        "formatters": {log_format: formatters[log_format]},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": log_format, "filters": ["request"]}},
        "loggers": {"clipfusion": handler, "uvicorn": handler},
    }


def log_access(method: str, path: str, status: int, milliseconds: float, actor: str) -> None:
    """The one access line of a request (uvicorn's own is off: it knows neither request id nor key)."""
    access.info("%s %s %d %.0f ms (request %s%s)", method, path, status, milliseconds, REQUEST_ID.get(),
                f", key {actor}" if actor else "",
                extra={"method": method, "path": path, "status": status, "ms": round(milliseconds, 1), "actor": actor})
