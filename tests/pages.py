"""Opening a written HTML page in the session's headless Chromium and checking what a user would see."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class OpenedPage:
    page: Any
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def open_page(browser: Any, path: Path, width: int = 1200) -> OpenedPage:
    """``path`` loaded in a fresh page; every request URL and every console error or page error recorded."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    opened = OpenedPage(page)
    page.on("request", lambda request: opened.requests.append(request.url))
    page.on("console", lambda message: opened.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return opened


def check_self_contained(opened: OpenedPage, path: Path) -> None:
    """No console error, and nothing requested but the page itself and data: URIs (no external URL)."""
    assert opened.errors == []
    foreign = [url for url in opened.requests if url != path.resolve().as_uri() and not url.startswith("data:")]
    assert foreign == []


def screenshot_is_not_blank(opened: OpenedPage) -> None:
    """The rendered page has real content: many distinct colours, not a flat background."""
    shot = np.asarray(Image.open(io.BytesIO(opened.page.screenshot())).convert("RGB"))
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    assert colours > 500 and shot.std() > 20, (colours, shot.std())
