"""The API's own documentation, only with ``serve --docs``: ``/openapi.json`` and a Swagger UI page at
``/docs`` whose scripts come from the ``fastapi-offline`` package (no CDN: the line's network may have no
internet).  With API keys, ``/openapi.json`` needs one like the API, and the page sends the key kept for
the tab (typed on the page or on the operator page)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from clipfusion.errors import ClipfusionError
from clipfusion.service.dependencies import require_api_key
from clipfusion.service.routers.page import PAGE

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json", dependencies=[Depends(require_api_key)])
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", response_class=HTMLResponse)
def docs_page() -> HTMLResponse:
    return HTMLResponse((PAGE / "docs.html").read_text(encoding="utf-8"))


def swagger_assets() -> Path:
    """The Swagger UI scripts and styles shipped in ``fastapi-offline``."""
    try:
        import fastapi_offline
    except ImportError:
        raise ClipfusionError("serve --docs serves the API's page from the fastapi-offline package, which is "
                              "missing: pip install 'clipfusion[serve]'") from None
    return Path(fastapi_offline.__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add /docs, its assets (/docs-static) and /openapi.json to ``app``."""
    app.include_router(router)
    app.mount("/docs-static", StaticFiles(directory=swagger_assets()), name="docs-static")
