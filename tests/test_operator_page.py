"""The operator page in headless Chromium against the running service: key, upload, overlay,
history row, false-alarm feedback recorded; no console error, nothing loaded from outside."""
from __future__ import annotations

from pathlib import Path

import httpx

from .conftest import API_KEY
from .pages import screenshot_is_not_blank

ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_an_operator_uploads_an_image_sees_its_verdict_and_marks_a_false_alarm(service, synthetic_root, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error"
            and "401" not in message.text else None)  # the first, keyless call is refused by design
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(service.url + "/")
    page.wait_for_selector("#key-label:not([hidden])")  # the service wants a key: the page asks for it
    page.fill("#key", API_KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length === 1")
    assert "disc" in page.inner_text("#model-panel") and "image threshold" in page.inner_text("#model-panel")
    # the key lives as long as the tab: never in localStorage, which outlives it on a shared line PC
    assert page.evaluate("localStorage.getItem('clipfusion-key')") is None
    assert page.evaluate("sessionStorage.getItem('clipfusion-key')") == API_KEY

    image = sorted((synthetic_root / "disc" / "test" / "hole").iterdir())[0]
    page.set_input_files("#files", str(image))
    figure = page.wait_for_selector("#results figure")
    page.wait_for_function("document.querySelector('#results figure img').naturalWidth > 0")
    identifier = figure.get_attribute("data-id")
    assert image.name in figure.inner_text()
    row = page.wait_for_selector(f"#history tr[data-id='{identifier}']")
    assert image.name in row.inner_text()

    row.query_selector("button:has-text('false alarm')").click()
    page.wait_for_function(f"document.querySelector(\"#history tr[data-id='{identifier}'] td:nth-child(7)\")"
                           ".textContent === 'false alarm'")
    recorded = httpx.get(f"{service.url}/v1/inspections/{identifier}", headers={"X-API-Key": API_KEY}).json()
    assert [f["label"] for f in recorded["feedback"]] == ["normal"]

    ARTEFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "operator-page.png"), full_page=True)
    opened = type("Opened", (), {"page": page})()
    screenshot_is_not_blank(opened)
    assert errors == []
    assert all(url.startswith(service.url) or url.startswith("blob:") for url in requests), requests
    page.close()


def test_the_api_page_lists_the_operations_with_the_tabs_key_and_nothing_from_outside(service, browser):
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(service.url + "/docs")
    page.fill("#key", API_KEY)
    page.dispatch_event("#key", "change")
    # the schema came, with the key: Swagger UI lists its operations
    page.wait_for_selector("[data-path='/v1/models/{name}/inspect']", timeout=30_000)
    assert page.evaluate("sessionStorage.getItem('clipfusion-key')") == API_KEY
    assert any(url.endswith("/openapi.json") for url in requests)
    assert all(url.startswith(service.url) or url.startswith("data:") for url in requests), requests
    page.close()
