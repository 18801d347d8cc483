"""The one inspection core: maps at each image's own size, thresholds and regions where the signal is,
per-image errors, one threshold derivation honouring the pixel limit; layering checked by walking the
imports; every detector an estimator (scikit-learn's clone gives equal maps); the README's example runs."""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipfusion
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError
from clipfusion.images import Images, as_rgb_list
from clipfusion.inspection import Decisions, Inspector, ModelFile, derive_thresholds
from clipfusion.methods.registry import METHODS, make_detector_factory
from clipfusion.protocol import Prediction

SRC = Path(clipfusion.__file__).parent
README = SRC.parents[1] / "README.md"
LOW, HIGH = 0.1, 0.9
# the square the fixed map is anomalous in, in the map's (256, 256) pixels: rows 64..127, columns 128..191
SQUARE = (64, 128, 128, 192)


class FixedMap:
    """A detector giving every image the score 0.7 and a (256, 256) map at LOW with a square at HIGH; an
    image whose first pixel is pure red gets a NaN score (a model that failed on it)."""

    def predict(self, images: Images, category: str | None = None) -> Prediction:
        arrays = as_rgb_list(images)
        raw = np.full((len(arrays), 256, 256), LOW, np.float32)
        top, bottom, left, right = SQUARE
        raw[:, top:bottom, left:right] = HIGH
        scores = np.array([np.nan if tuple(a[0, 0]) == (255, 0, 0) else 0.7 for a in arrays], np.float32)
        return Prediction(scores, raw)


def decisions(image: float = 0.5, pixel: float = 0.5) -> Decisions:
    normal = Thresholds(image=image, pixel=pixel, normal_min=0.3, normal_max=0.5, normal_mean=0.4, normal_std=0.05,
                        pixel_median=0.2, rule="fixed", n_normals=3)
    return Decisions(image, pixel, "fixed", normal.colour_scale, normal)


def test_regions_are_found_in_each_images_own_pixels_and_decided():
    """A 100 x 300 image: the map's square (rows 64-128, columns 128-192 of 256) lands at rows 25-50 and
    columns 150-225 of the image (scaled by 100/256 and 300/256); threshold halfway, so the box is exact
    to a pixel."""
    inspector = Inspector(FixedMap(), decisions(), min_area=1)
    (inspection,) = inspector.inspect([np.zeros((100, 300, 3), np.uint8)])
    assert inspection.ok and inspection.decision == "NG" and inspection.threshold == 0.5
    assert inspection.anomaly_map.shape == (100, 300) and inspection.mask.shape == (100, 300)
    assert inspection.raw_map.shape == (256, 256)
    (region,) = inspection.regions
    top, bottom, left, right = SQUARE
    expected = (left * 300 / 256, top * 100 / 256, (right - left) * 300 / 256, (bottom - top) * 100 / 256)
    assert np.allclose((region.x, region.y, region.width, region.height), expected, atol=1)
    assert region.peak == pytest.approx(HIGH) and inspection.mask.sum() == region.area
    # normalised: 0.5 at the threshold, +0.5 per normal range (0.2): 0.7 → 1.0, clipped
    assert inspection.normalised_score == pytest.approx(1.0)


def test_the_normalised_score_is_one_half_at_the_threshold_and_the_decision_ok_there():
    (inspection,) = Inspector(FixedMap(), decisions(image=0.7)).inspect([np.zeros((8, 8, 3), np.uint8)])
    assert inspection.normalised_score == pytest.approx(0.5) and inspection.decision == "OK"


def test_one_bad_image_gets_its_error_and_the_others_their_verdicts(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    red = np.zeros((16, 16, 3), np.uint8)
    red[0, 0] = (255, 0, 0)
    good = tmp_path / "good.png"
    Image.fromarray(np.full((16, 16, 3), 40, np.uint8)).save(good)
    inspections = Inspector(FixedMap(), decisions()).inspect([good, broken, red, np.zeros((2, 2, 5))])
    assert [i.ok for i in inspections] == [True, False, False, False]
    assert inspections[0].source == str(good) and inspections[1].source == str(broken)
    assert "not finite" in inspections[2].error and inspections[2].score is None
    assert "(H, W, 3)" in inspections[3].error


def test_without_thresholds_there_is_no_decision_and_no_region():
    (inspection,) = Inspector(FixedMap()).inspect([np.zeros((8, 8, 3), np.uint8)])
    assert inspection.decision == "no threshold" and inspection.regions is None and inspection.mask is None
    assert inspection.normalised_score is None and inspection.anomaly_map.shape == (8, 8)


def test_thresholds_are_derived_from_the_images_under_the_pixel_limit(tmp_path):
    """Three normal files, one of 200 x 200 pixels: with max_pixels 10 000 it is left out (n_normals 2)."""
    for index, side in enumerate((50, 60, 200)):
        Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(tmp_path / f"{index}.png")
    files = sorted(tmp_path.glob("*.png"))
    assert derive_thresholds(FixedMap(), files, batch_size=2).n_normals == 3
    limited = derive_thresholds(FixedMap(), files, batch_size=2, max_pixels=10_000)
    assert limited.n_normals == 2 and limited.image == pytest.approx(0.7)
    assert limited.pixel == pytest.approx(HIGH)  # the 99.9 % quantile of maps that are 1/16 HIGH


# --- layering ---------------------------------------------------------------------------------------------


def imports_of(package: str) -> dict[str, set[str]]:
    """Every ``clipfusion.*`` module imported (at the top or inside a function) by each module of
    ``clipfusion.<package>``: {module file: imported names}."""
    found: dict[str, set[str]] = {}
    for path in sorted((SRC / package).rglob("*.py")) if (SRC / package).is_dir() else [SRC / f"{package}.py"]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(SRC))] = {n for n in names if n.startswith("clipfusion.")}
    return found


FORBIDDEN = {  # package → what it must never import: arrows point down, front ends never sideways
    "inspection": ("tasks", "cli", "service", "distributed", "export"),
    "runtime": ("tasks", "cli", "service", "distributed", "export", "inspection", "methods.clipfusion.detector"),
    "service": ("tasks", "cli", "distributed", "export"),
    "distributed": ("tasks", "cli", "service", "export"),
    "export": ("tasks", "cli", "service", "distributed"),
    "tasks": ("cli", "service"),
    "methods": ("tasks", "cli", "service", "distributed", "export", "inspection", "runtime"),
    "feeds": ("tasks", "cli", "service", "distributed", "export"),
    "publishing": ("tasks", "cli", "service", "distributed", "export", "feeds", "inspection", "methods"),
}


def test_the_import_walk_sees_lazy_imports():
    """The walk is not vacuous: tasks.predict imports the core at the top, tasks.fit the detector lazily."""
    assert "clipfusion.inspection.core" in imports_of("tasks")["tasks/predict.py"]
    assert "clipfusion.methods.clipfusion.detector" in imports_of("tasks")["tasks/fit.py"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package):
    wrong = {module: sorted(name for name in names for below in FORBIDDEN[package]
                            if name == f"clipfusion.{below}" or name.startswith(f"clipfusion.{below}."))
             for module, names in imports_of(package).items()}
    assert not {module: names for module, names in wrong.items() if names}


# --- estimators -------------------------------------------------------------------------------------------


def tiny_params(method: str) -> dict:
    from clipfusion.config import RuntimeConfig

    return {} if method == "mean-image" else {"preset": "tiny", "runtime": RuntimeConfig("cpu", "float32"),
                                              "batch_size": 4}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_rebuilt_from_its_own_params_with_equal_maps(method, scenes):
    """scikit-learn's own clone (an independent reference of the convention) and ``type(d)(**d.get_params())``
    give detectors that, fitted on the same references, give the same maps."""
    from sklearn.base import clone

    normal, defective, _ = scenes
    detector = make_detector_factory(method, **tiny_params(method))()
    if method == "clipfusion":
        detector.set_params(fusion__alpha_seg=0.3)
    expected = detector.fit(normal[:2], "disc").predict(defective[:3])
    for copy in (clone(detector), type(detector)(**detector.get_params())):
        assert not hasattr(copy, "memory_bank_") and not hasattr(copy, "mean_image_")  # unfitted
        assert copy.get_params() == detector.get_params()
        got = copy.fit(normal[:2], "disc").predict(defective[:3])
        assert np.array_equal(got.maps, expected.maps) and np.array_equal(got.scores, expected.scores)


def test_set_params_changes_the_maps_and_refuses_unknown_settings(scenes):
    from clipfusion import CLIPFusion

    _, defective, _ = scenes
    detector = CLIPFusion.from_preset("tiny", device="cpu", dtype="float32")
    before = detector.predict(defective[:2], "disc").maps
    detector.set_params(fusion__sigma=0.0)
    assert detector.config.fusion.sigma == 0.0 and detector.get_params()["fusion__sigma"] == 0.0
    assert not np.allclose(detector.predict(defective[:2], "disc").maps, before)
    with pytest.raises(ClipfusionError, match="unknown setting"):
        detector.set_params(fusion__nonsense=1)
    from clipfusion import WinCLIP

    with pytest.raises(ClipfusionError, match="no setting clip"):
        WinCLIP().set_params(clip="x")


def test_a_loaded_model_predicts_for_its_own_category_without_being_told(model, synthetic_root):
    from clipfusion import CLIPFusion

    image = next((synthetic_root / "disc" / "test").rglob("*.png"))
    detector = CLIPFusion.load(model)
    told = detector.predict(image, "disc")
    assert np.array_equal(detector.predict(image).maps, told.maps)
    with pytest.raises(ClipfusionError, match="'disc', not 'fabric'"):
        detector.predict(image, "fabric")


def test_the_public_names_are_importable_from_the_top_with_docstrings():
    for name in ("RuntimeConfig", "Thresholds", "Region", "Inspection", "Inspector", "ModelFile", "CLIPFusion"):
        value = getattr(clipfusion, name)
        assert name in clipfusion.__all__ and value.__doc__ and len(value.__doc__) > 40, name


def test_an_opened_model_file_knows_its_identity_and_the_options_it_fixes(model):
    import hashlib

    opened = ModelFile.open(model)
    assert opened.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (opened.category, opened.preset, opened.is_export) == ("disc", "tiny", False)
    with pytest.raises(ClipfusionError, match="--shots \\(the model file fixes it\\); --category fabric"):
        opened.check_options({"--shots": 2, "--memory": None}, category="fabric")


def test_the_readme_python_example_runs(model, synthetic_root, tmp_path, monkeypatch):
    """The first Python block of the README, run in a folder holding the files it names (the tiny preset
    stands in for the real weights, which tests cannot download)."""
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    code = block.group(1).replace('"paper-recon"', '"tiny"')
    shutil.copy(model, tmp_path / "bottle.cfm")
    shutil.copytree(synthetic_root / "disc" / "train" / "good", tmp_path / "good_parts")
    tests = sorted((synthetic_root / "disc" / "test").rglob("*.png"))
    shutil.copy(tests[0], tmp_path / "part_0042.png")
    shutil.copy(tests[-1], tmp_path / "part_0043.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert ModelFile.open(tmp_path / "bottle-api.cfm").category == "bottle"
