"""What ``predict`` gives a production line: regions, masks, annotated overlays, streamed and resumable
rows, and index.html, checked against independent computations and in headless Chromium."""
from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage
from skimage import measure

from clipfusion.decisions import Region, find_regions
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.clipfusion.model_file import read_card
from clipfusion.overlays import BANNER_COLOURS, BOX_COLOUR, COLORMAP, inspection_overlay, overlay
from clipfusion.protocol import Prediction
from clipfusion.row_log import RowLog

from .commands import clipfusion_here, results
from .pages import check_self_contained, open_page, screenshot_is_not_blank

# --- regions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_equal_scikit_image_components(seed):
    rng = np.random.default_rng(seed)
    anomaly_map = ndimage.gaussian_filter(rng.random((90, 130)), 3)
    threshold = float(np.quantile(anomaly_map, 0.9))
    mask, regions = find_regions(anomaly_map, threshold, min_area=20)
    labels = measure.label(anomaly_map > threshold, connectivity=2)
    expected = [p for p in measure.regionprops(labels, intensity_image=anomaly_map) if p.area >= 20]
    assert len(expected) >= 2  # the data has several components, some below the minimum area
    assert len(expected) < labels.max()
    expected.sort(key=lambda p: -p.intensity_max)
    assert [(r.y, r.x, r.y + r.height, r.x + r.width) for r in regions] == [tuple(p.bbox) for p in expected]
    assert [r.area for r in regions] == [int(p.area) for p in expected]
    assert [r.peak for r in regions] == pytest.approx([float(p.intensity_max) for p in expected])
    np.testing.assert_array_equal(mask, np.isin(labels, [p.label for p in expected]))


def test_regions_of_a_prediction_are_in_each_images_own_pixels():
    small = np.zeros((64, 64), np.float32)
    small[8:16, 40:56] = 1.0  # rows 8-15, columns 40-55 of the 64² map
    prediction = Prediction(np.array([0.9, 0.1], np.float32), np.stack([small, np.zeros_like(small)]),
                            input_sizes=[(300, 640), (300, 640)], image_threshold=0.5, pixel_threshold=0.5)
    assert prediction.labels() == ["NG", "OK"]
    regions = prediction.regions()
    assert regions[1] == []
    [region] = regions[0]
    # the square spans rows 8/64..16/64 of 300 and columns 40/64..56/64 of 640; bilinear edges move it ≤ 1 cell
    cell_rows, cell_cols = 300 / 64, 640 / 64
    assert abs(region.y - 8 * cell_rows) <= cell_rows and abs(region.y + region.height - 16 * cell_rows) <= cell_rows
    assert abs(region.x - 40 * cell_cols) <= cell_cols and abs(region.x + region.width - 56 * cell_cols) <= cell_cols
    with pytest.raises(ValueError, match="no image threshold"):
        Prediction(prediction.scores, prediction.maps).labels()


def test_a_loaded_model_labels_and_regions_follow_its_thresholds(model, synthetic_root):
    thresholds = read_card(model).thresholds
    images = [np.asarray(Image.open(p).convert("RGB").resize((150, 90)))
              for p in sorted((synthetic_root / "disc" / "test").rglob("*.png"))]
    prediction = CLIPFusion.load(model).predict(images, "disc")
    assert prediction.labels() == ["NG" if s > thresholds.image else "OK" for s in prediction.scores]
    for amap, regions in zip(prediction.maps_at_input_size(), prediction.regions(), strict=True):
        assert amap.shape == (90, 150)
        above = amap > thresholds.pixel
        assert sum(r.area for r in regions) == int(above.sum())  # min area 1: every pixel above is in one
        assert all(r.x >= 0 and r.x + r.width <= 150 and r.y >= 0 and r.y + r.height <= 90 for r in regions)


# --- the annotated overlay --------------------------------------------------------------------------------


@pytest.mark.parametrize(("decision", "colour"), [("NG", BANNER_COLOURS["NG"]), ("OK", BANNER_COLOURS["OK"]),
                                                  ("no threshold", (90, 90, 90))])
def test_the_overlay_keeps_the_image_and_adds_verdict_boxes_and_colour_bar(decision, colour):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 200, 3), dtype=np.uint8)
    anomaly_map = np.linspace(0.0, 1.0, 60 * 200, dtype=np.float32).reshape(60, 200)
    box = Region(x=120, y=20, width=30, height=20, area=600, peak=1.0)
    picture = inspection_overlay(image, anomaly_map, (0.0, 1.0), "title", decision, [box], pixel_threshold=0.5)
    assert picture.shape[1] == 200  # the image's own width
    banner = next(row for row in range(picture.shape[0]) if tuple(picture[row, 199]) != colour)
    assert tuple(picture[0, 199]) == colour and tuple(picture[banner - 1, 0]) == colour
    body = picture[banner:banner + 60]
    expected = overlay(image, anomaly_map, 0.0, 1.0)
    away = np.ones((60, 200), bool)
    away[15:45, 115:155] = False  # outside the box's outline
    np.testing.assert_array_equal(body[away], expected[away])
    assert tuple(body[20 - 1, 135]) == BOX_COLOUR and tuple(body[20 + 20, 135]) == BOX_COLOUR
    bar = picture[banner + 61]
    for column, value in ((0, 0.0), (199, 1.0)):
        assert np.abs(bar[column].astype(float) - np.array(colormaps[COLORMAP](value)[:3]) * 255).max() <= 2
    assert (bar[99:101] == 0).all(axis=1).any()  # the threshold's tick, mid-scale


# --- rows streamed to disk --------------------------------------------------------------------------------------


def test_a_torn_last_row_is_dropped_and_the_csv_rebuilt(tmp_path):
    with RowLog(tmp_path, ["path", "score", "regions"]) as log:
        log.append({"path": "a.png", "score": 0.5, "regions": [{"x": 1}]})
        log.append({"path": "b.png", "score": float("nan"), "regions": None})
    with (tmp_path / "results.jsonl").open("ab") as handle:
        handle.write(b'{"path": "c.png", "sco')  # a kill in the middle of a write
    (tmp_path / "results.csv").write_text("damaged")
    with RowLog(tmp_path, ["path", "score", "regions"]) as log:
        assert [row["path"] for row in log.rows] == ["a.png", "b.png"]
        log.append({"path": "d.png", "score": 1.0, "regions": []})
    assert [row["path"] for row in results(tmp_path)] == ["a.png", "b.png", "d.png"]
    assert results(tmp_path)[1]["score"] is None  # strict JSON: NaN is null
    with (tmp_path / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["path"], r["regions"]) for r in rows] == [("a.png", '[{"x":1}]'), ("b.png", ""), ("d.png", "[]")]


def _photos(synthetic_root: Path, folder: Path) -> list[Path]:
    shutil.copytree(synthetic_root / "disc" / "test", folder)
    return sorted(p.resolve() for p in folder.rglob("*.png"))


def _wait_for_rows(out: Path, count: int, process: subprocess.Popen, limit: float = 240.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        jsonl = out / "results.jsonl"
        if jsonl.is_file() and jsonl.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"predict wrote fewer than {count} rows in {limit} s (exit {process.poll()})")


def test_an_interrupted_run_tells_the_truth_and_resumes_without_scoring_twice(model, synthetic_root, tmp_path):
    paths = _photos(synthetic_root, tmp_path / "photos")
    out = tmp_path / "out"
    command = [str(Path(sys.executable).with_name("clipfusion")), "predict", str(tmp_path / "photos"), "--model",
               str(model), "--out", str(out), "--batch-size", "1", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "results.jsonl" in stderr and "--resume" in stderr
    interrupted = results(out)
    assert 2 <= len(interrupted) < len(paths)
    refused = clipfusion_here("predict", str(tmp_path / "photos"), "--model", str(model), "--out", str(out),
                              "--resume", "--min-region-area", "5", "--quiet")
    assert refused.returncode == 2 and "min_area was 16, now 5" in refused.stderr
    process = subprocess.Popen([*command, "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_rows(out, len(interrupted) + 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    resumed = clipfusion_here(*command[1:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    rows = results(out)
    assert sorted(row["path"] for row in rows) == [str(p) for p in paths]  # each image exactly once
    assert rows[:len(interrupted)] == interrupted  # earlier rows untouched
    expected = CLIPFusion.load(model).predict(paths, "disc").scores
    scores = {row["path"]: row["score"] for row in rows}
    assert [scores[str(p)] for p in paths] == pytest.approx(expected.tolist(), abs=1e-5)
    with (out / "results.csv").open(newline="") as handle:
        assert [r["path"] for r in csv.DictReader(handle)] == [row["path"] for row in rows]
    assert json.loads((out / "summary.json").read_text())["images"] == len(paths)


# --- masks, overlays and index.html of a run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(model, synthetic_root, tmp_path_factory):
    """predict --model on non-square copies of the test images, half of them NG (threshold at the median)."""
    photos = tmp_path_factory.mktemp("photos")
    for source in sorted((synthetic_root / "disc" / "test").rglob("*.png")):
        Image.open(source).resize((150, 90)).save(photos / f"{source.parent.name}-{source.name}")
    scores = CLIPFusion.load(model).predict(sorted(photos.iterdir()), "disc").scores
    out = tmp_path_factory.mktemp("run") / "out"
    result = clipfusion_here("predict", str(photos), "--model", str(model), "--threshold", str(np.median(scores)),
                             "--min-region-area", "1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_masks_and_overlays_are_at_each_images_own_size(run, model):
    pixel = read_card(model).thresholds.pixel
    rows = results(run)
    assert {row["decision"] for row in rows} == {"NG", "OK"}
    # the run's batches of 8 in the run's order: the same computation, so the same numbers
    prediction = CLIPFusion.load(model).predict([row["path"] for row in rows], "disc")
    for row, raw_map, full_map in zip(rows, prediction.maps, prediction.maps_at_input_size(), strict=True):
        np.testing.assert_array_equal(np.load(run / row["map"]), raw_map)
        overlay_picture = Image.open(run / row["overlay"])
        assert overlay_picture.width == 150 and overlay_picture.height > 90
        assert (row["mask"] is not None) == (row["decision"] == "NG")
        if row["mask"]:
            mask = np.asarray(Image.open(run / row["mask"])) > 0
            assert mask.shape == (90, 150)
            assert int(mask.sum()) == sum(r["area"] for r in row["regions"])
            np.testing.assert_array_equal(mask, full_map > pixel)


def test_index_html_is_self_contained_sorted_and_filters(run, browser):
    rows = results(run)
    opened = open_page(browser, run / "index.html")
    check_self_contained(opened, run / "index.html")
    screenshot_is_not_blank(opened)
    page = opened.page
    captions = page.locator("#cards figcaption").all_inner_texts()
    assert len(captions) == len(rows)
    scores = [float(text.split("score ")[1].split()[0]) for text in captions]
    assert scores == sorted(scores, reverse=True)
    for verdict in ("OK", "NG"):
        page.click(f"button[data-filter={verdict}]")
        shown = page.locator("#cards figure:visible .verdict").all_inner_texts()
        assert shown == [verdict] * sum(r["decision"] == verdict for r in rows) and shown
    page.close()


def test_a_given_threshold_is_where_the_normalised_score_is_one_half(run, model):
    """``run`` decided with --threshold (the median score), not the model's: the normalised score follows it."""
    thresholds, rows = read_card(model).thresholds, results(run)
    given = rows[0]["threshold"]
    assert given != thresholds.image
    span = thresholds.normal_max - thresholds.normal_min  # the model's normal range, per unit of score
    for row in rows:
        assert row["normalised_score"] == pytest.approx(min(1.0, max(0.0, 0.5 + (row["score"] - given) / span)),
                                                        abs=1e-6)
        assert row["normalised_score"] >= 0.5 if row["decision"] == "NG" else row["normalised_score"] <= 0.5


def test_index_links_reach_files_whose_names_hold_url_characters(model, synthetic_root, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    source = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[0]
    for name in ("part#1.png", "what?.png", "lot%20A.png", "a b.png"):
        shutil.copy(source, photos / name)
    out = tmp_path / "out"
    assert clipfusion_here("predict", str(photos), "--model", str(model), "--out", str(out), "--quiet").returncode == 0
    hrefs = re.findall(r'<a href="([^"]+)">', (out / "index.html").read_text())
    assert len(hrefs) == 4
    # read as a browser reads a relative link: the URL's path, percent-decoded by the standard library
    linked = {(out / url2pathname(urlsplit(href).path)).resolve() for href in hrefs}
    assert linked == {(out / row["overlay"]).resolve() for row in results(out)}
    assert all(path.is_file() for path in linked)


# --- the evaluation report in Chromium -------------------------------------------------------------------------


def test_the_report_opens_clean_with_the_tiny_banner_first_and_true_aspect_ratios(synthetic_root, tmp_path, browser):
    root = tmp_path / "wide"  # the synthetic data at 120×80: gallery images are not square
    for source in synthetic_root.rglob("*.png"):
        target = root / source.relative_to(synthetic_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        resample = Image.Resampling.NEAREST if "ground_truth" in source.parts else Image.Resampling.BICUBIC
        Image.open(source).resize((120, 80), resample).save(target)
    shutil.copy(synthetic_root / "synthetic.json", root / "synthetic.json")
    out = tmp_path / "run"
    result = clipfusion_here("evaluate", "--dataset", "mvtec", "--root", str(root), "--preset", "tiny",
                             "--shots", "0", "1", "--eval-size", "native", "--dtype", "float32", "--out", str(out),
                             "--quiet")
    assert result.returncode == 0, result.stderr
    opened = open_page(browser, out / "report.html")
    check_self_contained(opened, out / "report.html")
    screenshot_is_not_blank(opened)
    page = opened.page
    assert page.locator("body > *").first.get_attribute("class") == "banner"  # tiny: said before anything else
    meta = page.locator("p.meta").all_inner_texts()
    assert any(text.startswith("clipfusion ") and "written" in text for text in meta)
    assert any("dataset synthetic (MVTec layout)" in text and "dtype float32" in text for text in meta)
    sizes = page.eval_on_selector_all("figure img", "els => els.map(e => [e.naturalWidth, e.naturalHeight, "
                                                    "e.clientWidth, e.clientHeight])")
    assert sizes
    for natural_w, natural_h, shown_w, shown_h in sizes:
        assert natural_w > natural_h  # the wide images...
        assert shown_w / shown_h == pytest.approx(natural_w / natural_h, rel=0.03)  # ...shown undistorted
    categories = []
    for group in page.locator(".plots").all():  # one category per row of plots
        alts = group.locator("img").evaluate_all("els => els.map(e => e.alt)")
        categories.append({alt.split()[-1] for alt in alts})
    assert categories[:2] == [{"fabric"}, {"disc"}] or categories[:2] == [{"disc"}, {"fabric"}]
    page.close()


def test_a_run_that_stopped_before_its_first_row_is_started_afresh(model, synthetic_root, tmp_path):
    """A crash (or an error) before any image was scored leaves run.json and no row: a plain run into the
    folder starts again, where one with rows asks for --resume or --overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"identity": {"model_id": "another"}}')
    (out / ".clipfusion-output.json").write_text('{"kind": "predict"}')
    (out / "overlays").mkdir()
    (out / "overlays" / "000000_orphan.png").write_bytes(b"written before its row")
    images = str(synthetic_root / "disc" / "test" / "good")
    done = clipfusion_here("predict", images, "--model", str(model), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert len(results(out)) == len(list((synthetic_root / "disc" / "test" / "good").glob("*.png")))
    assert not (out / "overlays" / "000000_orphan.png").exists()  # the stopped run's own files were replaced
    again = clipfusion_here("predict", images, "--model", str(model), "--out", str(out), "--quiet")
    assert again.returncode == 2 and "holds an earlier predict run" in again.stderr
