"""The operator page at / (plain HTML, CSS and JavaScript shipped in the package: no CDN, works offline)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

PAGE = Path(__file__).resolve().parents[1] / "page"
router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def operator_page() -> HTMLResponse:
    return HTMLResponse((PAGE / "index.html").read_text(encoding="utf-8"))


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=PAGE), name="static")
