from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfusion.data import MVTecDataset
from clipfusion.errors import ClipfusionError
from clipfusion.evaluation.runner import EvaluationConfig, EvaluationRunner
from clipfusion.evaluation.tables import METRICS
from clipfusion.methods.mean_image import MeanImageDetector
from clipfusion.protocol import Prediction

RUN_KEYS = {"category", "shots", "seed", "n_images", "references", *METRICS, "seconds"}


def _config(root: Path, **overrides) -> EvaluationConfig:
    settings = {"dataset": "mvtec", "root": str(root), "method": "mean-image",
                "categories": ["disc", "fabric"], "shots": [0, 1], "seeds": [0, 1]}
    return EvaluationConfig(**{**settings, **overrides})


class CountingDetector(MeanImageDetector):
    calls = 0

    def predict(self, images, category):
        CountingDetector.calls += 1
        return super().predict(images, category)


def test_runner_writes_the_documented_schema(synthetic_root, tmp_path):
    results = EvaluationRunner(_config(synthetic_root), MVTecDataset(synthetic_root), MeanImageDetector,
                               tmp_path, progress=False).run()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    assert set(results) == {"config", "runs", "summary", "mean"}
    # zero-shot once per category, few-shot once per seed
    assert [(r["category"], r["shots"], r["seed"]) for r in results["runs"]] == [
        ("disc", 0, 0), ("disc", 1, 0), ("disc", 1, 1), ("fabric", 0, 0), ("fabric", 1, 0), ("fabric", 1, 1)]
    for run in results["runs"]:
        assert set(run) == RUN_KEYS
        assert run["n_images"] == 9
        assert len(run["references"]) == run["shots"]
        assert all((synthetic_root / run["category"] / "train" / "good" / name).is_file()
                   for name in run["references"])
        assert all(0.0 <= run[m] <= 1.0 for m in METRICS)
    few_shot = [r for r in results["runs"] if r["shots"] == 1 and r["category"] == "disc"]
    assert few_shot[0]["references"] != few_shot[1]["references"]
    assert set(results["mean"]) == {"0", "1"}
    assert set(results["mean"]["1"]) == set(METRICS)
    row = next(r for r in results["summary"] if r["category"] == "disc" and r["shots"] == 1)
    values = [r["pixel_auroc"] for r in few_shot]
    assert row["pixel_auroc_mean"] == pytest.approx(np.mean(values))
    assert row["pixel_auroc_std"] == pytest.approx(np.std(values))
    assert results["config"]["eval_size"] == 256

    with (tmp_path / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 9
    assert set(rows[0]) == {"path", "category", "defect", "label", "score", "shots", "seed"}
    markdown = (tmp_path / "results.md").read_text()
    assert "## 1-shot" in markdown and "| **mean** |" in markdown and "±" in markdown


def test_rerun_skips_finished_units_and_resumes_after_interruption(synthetic_root, tmp_path):
    dataset = MVTecDataset(synthetic_root)

    class InterruptingDetector(CountingDetector):
        def fit(self, images, category):
            if category == "fabric":
                raise KeyboardInterrupt
            return super().fit(images, category)

    with pytest.raises(KeyboardInterrupt):
        EvaluationRunner(_config(synthetic_root), dataset, InterruptingDetector, tmp_path, progress=False).run()
    finished = sorted(p.relative_to(tmp_path / "units").as_posix() for p in (tmp_path / "units").rglob("*.json"))
    assert finished == ["disc/k0_s0.json", "disc/k1_s0.json", "disc/k1_s1.json", "fabric/k0_s0.json"]

    CountingDetector.calls = 0
    EvaluationRunner(_config(synthetic_root), dataset, CountingDetector, tmp_path, progress=False).run()
    assert CountingDetector.calls == 2 * 2  # two fabric few-shot units, 9 images in batches of 8
    CountingDetector.calls = 0
    results = EvaluationRunner(_config(synthetic_root), dataset, CountingDetector, tmp_path, progress=False).run()
    assert CountingDetector.calls == 0
    assert len(results["runs"]) == 6


def test_out_dir_with_other_settings_is_refused(synthetic_root, tmp_path):
    dataset = MVTecDataset(synthetic_root)
    EvaluationRunner(_config(synthetic_root, shots=[0]), dataset, MeanImageDetector, tmp_path, progress=False).run()
    with pytest.raises(ClipfusionError, match=r"eval_size: 256 → 128.*--overwrite"):
        EvaluationRunner(_config(synthetic_root, shots=[0], eval_size=128), dataset, MeanImageDetector,
                         tmp_path, progress=False).run()


def test_unreadable_image_is_reported_and_skipped(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "disc", root / "disc")
    broken = root / "disc" / "test" / "good" / "001.png"
    broken.write_bytes(broken.read_bytes()[:200])
    results = EvaluationRunner(_config(root, categories=["disc"], shots=[0]), MVTecDataset(root),
                               MeanImageDetector, tmp_path / "out", progress=False).run()
    assert results["runs"][0]["n_images"] == 8
    with (tmp_path / "out" / "skipped.csv").open() as handle:
        skipped = list(csv.DictReader(handle))
    assert [row["path"] for row in skipped] == [str(broken)]
    assert skipped[0]["reason"]


class BrightnessDetector:
    """Map = image brightness on a 24×40 grid (deliberately not square, not the image size)."""

    def fit(self, images, category):
        return self

    def get_params(self):
        return {}

    def predict(self, images, category):
        maps = np.stack([
            np.asarray(Image.fromarray(im).convert("L").resize((40, 24), Image.BILINEAR), np.float32) / 255
            for im in images
        ])
        return Prediction(scores=maps.reshape(len(maps), -1).max(axis=1), maps=maps)


@pytest.mark.parametrize("eval_size", [64, None])
def test_a_defect_at_a_known_place_lights_up_there(tmp_path, eval_size):
    """Bright squares in one corner of dark 120×80 images: maps must not be transposed or flipped."""
    category = tmp_path / "data" / "part"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (category / folder).mkdir(parents=True)
    dark = np.full((80, 120, 3), 20, np.uint8)
    for i in range(3):
        Image.fromarray(dark).save(category / "train" / "good" / f"{i}.png")
        Image.fromarray(dark).save(category / "test" / "good" / f"{i}.png")
    for i, (y, x) in enumerate([(4, 4), (4, 80), (50, 90)]):
        image, mask = dark.copy(), np.zeros((80, 120), np.uint8)
        image[y:y + 24, x:x + 28] = 230
        mask[y:y + 24, x:x + 28] = 255
        Image.fromarray(image).save(category / "test" / "spot" / f"{i}.png")
        Image.fromarray(mask).save(category / "ground_truth" / "spot" / f"{i}_mask.png")
    config = _config(tmp_path / "data", categories=["part"], shots=[0], eval_size=eval_size)
    results = EvaluationRunner(config, MVTecDataset(tmp_path / "data"), BrightnessDetector,
                               tmp_path / "out", progress=False).run()
    run = results["runs"][0]
    assert run["image_auroc"] == 1.0
    assert run["pixel_auroc"] > 0.97
    assert run["pixel_aupro"] > 0.9
    assert results["config"]["eval_size"] == (eval_size or "native")


def test_mean_image_baseline_localises_a_texture_defect_one_shot(synthetic_root, tmp_path):
    """On the aligned, smooth-coloured fabric the 1-shot colour distance must find the defects."""
    config = _config(synthetic_root, categories=["fabric"], shots=[1], seeds=[0])
    run = EvaluationRunner(config, MVTecDataset(synthetic_root), MeanImageDetector, tmp_path,
                           progress=False).run()["runs"][0]
    assert run["pixel_auroc"] > 0.9
    assert run["image_auroc"] > 0.8
