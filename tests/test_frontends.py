"""The four front ends on one core: the same images through ``predict`` (local), ``predict --engine ray``,
the service (HTTP) and the exported runtime (``predict --model EXPORT``) give identical decisions and
regions, the same scores (the export's within its documented tolerance), because all four call
``clipfusion.inspection.Inspector``.  Float32 pinned everywhere: the numbers compared are the paths', not
a precision's."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .commands import clipfusion_here, results
from .servers import start_server

PINNED = ("--dtype", "float32", "--min-region-area", "1", "--quiet")
EXPORT_TOLERANCE = 1e-4  # of the map's range: docs/deploy.md


@pytest.fixture(scope="module")
def fp32_model(model_fitted_as: Callable[[str], Path]) -> Path:
    return model_fitted_as("0")


@pytest.fixture(scope="module")
def images(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The disc test images, defective and good (regions to find, and none), in one folder, each named by
    its kind (the comparison is by file name)."""
    folder = tmp_path_factory.mktemp("frontends") / "images"
    folder.mkdir()
    for path in (synthetic_root / "disc" / "test").rglob("*.png"):
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    return folder


def predicted(*args: str, out: Path) -> dict[str, dict]:
    result = clipfusion_here("predict", *args, "--out", str(out), *PINNED)
    assert result.returncode == 0, result.stderr
    return {Path(row["path"]).name: row for row in results(out)}


def served(model: Path, images: Path, data: Path) -> dict[str, dict]:
    server = start_server([model], data, "--dtype", "float32", "--min-region-area", "1")
    try:
        rows = {}
        for path in sorted(images.glob("*.png")):
            answer = httpx.post(f"{server.url}/v1/models/{model.stem}/inspect",
                                files={"files": (path.name, path.read_bytes(), "image/png")}, timeout=120)
            assert answer.status_code == 200, answer.text
            (inspection,) = answer.json()["inspections"]
            rows[path.name] = inspection
        return rows
    finally:
        server.stop()


def boxes(regions: list[dict] | None) -> list[tuple[int, int, int, int, int]]:
    return [(r["x"], r["y"], r["width"], r["height"], r["area"]) for r in regions or []]


def test_predict_ray_service_and_export_give_the_same_verdicts(fp32_model, images, ray_address, tmp_path):
    names = {p.name for p in images.glob("*.png")}
    local = predicted(str(images), "--model", str(fp32_model), out=tmp_path / "local")
    ray = predicted(str(images), "--model", str(fp32_model), "--engine", "ray", "--ray-address", ray_address,
                    out=tmp_path / "ray")
    export = tmp_path / "disc-ov"
    done = clipfusion_here("export", "--model", str(fp32_model), "--out", str(export), "--quiet")
    assert done.returncode == 0, done.stderr
    exported = predicted(str(images), "--model", str(export), out=tmp_path / "exported")
    service = served(fp32_model, images, tmp_path / "service")

    assert set(local) == set(ray) == set(exported) == set(service) == names
    assert any(row["regions"] for row in local.values()), "the images must hold regions to compare"
    assert {row["decision"] for row in local.values()} == {"OK", "NG"}, "and both decisions"
    for name in sorted(names):
        expected = local[name]
        for engine, row in (("ray", ray[name]), ("service", service[name]), ("export", exported[name])):
            assert row["decision"] == expected["decision"], (engine, name)
            assert boxes(row["regions"]) == boxes(expected["regions"]), (engine, name)
            tolerance = EXPORT_TOLERANCE if engine == "export" else 1e-5
            assert row["score"] == pytest.approx(expected["score"], abs=tolerance), (engine, name)
            assert row["normalised_score"] == pytest.approx(expected["normalised_score"], abs=tolerance * 10)
