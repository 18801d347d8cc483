"""The evaluation runner: categories × shots × seeds → metrics, resumable, written to a folder.

Each finished (category, shots, seed) unit is stored as ``units/<category>/k<shots>_s<seed>.json``
(written atomically), and skipped when the same command runs again, so an interrupted run loses
at most the unit in flight.  Zero-shot runs once (with the first seed): it has no references to
draw, and a method's own randomness is fixed by its settings.

Output files: ``results.json`` (config, runs, summary, mean), ``results.md`` (tables, percent),
``per_image.csv`` (one row per scored image), and ``skipped.csv`` when some files could not be read.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion import __version__
from clipfusion.api import Detector
from clipfusion.data import AnomalyDataset, Sample, SampleRef, read_rgb, sample_references
from clipfusion.data.base import read_images
from clipfusion.errors import ClipfusionError, DatasetError, ImageReadError
from clipfusion.imageops import resize_image, resize_maps, resize_mask
from clipfusion.metrics import IMAGE_METRICS, PIXEL_METRICS, image_metrics, pixel_metrics
from clipfusion.viz import overlay, thumbnail_jpeg

logger = logging.getLogger(__name__)
METRICS = IMAGE_METRICS + PIXEL_METRICS
METRIC_TITLES = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max",
    "pixel_aupro": "AUPRO", "pixel_aupro_legacy": "AUPRO-legacy",
}
# Settings that make two runs' units interchangeable; anything else may change between resumes.
_IDENTITY_KEYS = ("dataset", "root", "method", "method_params", "eval_size", "fpr_limit")


@dataclass
class EvaluationConfig:
    """What to evaluate.  ``eval_size`` is the side of the square the maps and masks are resized to
    for pixel metrics, or None for each mask's native size."""

    dataset: str
    root: str
    method: str
    categories: list[str]
    shots: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    method_params: dict[str, Any] = field(default_factory=dict)
    eval_size: int | None = 256
    batch_size: int = 8
    fpr_limit: float = 0.3

    def identity(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _IDENTITY_KEYS}

    def units(self) -> list[tuple[str, int, int]]:
        return [
            (category, shots, seed)
            for category in self.categories
            for shots in self.shots
            for seed in (self.seeds if shots > 0 else self.seeds[:1])
        ]


@dataclass
class SkippedFile:
    path: str
    reason: str
    category: str


def json_safe(value: Any) -> Any:
    """NaN/inf → null (JSON has no NaN), NumPy scalars → Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_samples(refs: Sequence[SampleRef], skipped: list[SkippedFile]) -> list[Sample]:
    """Load test samples; an unreadable image is logged, recorded in ``skipped`` and left out."""
    samples = []
    for ref in refs:
        try:
            samples.append(ref.load())
        except ImageReadError as exc:
            logger.warning("skipped %s", exc)
            skipped.append(SkippedFile(exc.path, exc.reason, ref.category))
    return samples


def load_references(dataset: AnomalyDataset, category: str, shots: int, seed: int,
                    skipped: list[SkippedFile]) -> tuple[list[str], list[np.ndarray]]:
    """File names and pixels of the ``shots`` references drawn with ``seed`` (none for zero-shot)."""
    if shots == 0:
        return [], []
    pool = dataset.train_images(category)
    if not pool:
        raise DatasetError(f"{category}: no normal training images to draw {shots} references from")
    paths, images, bad = read_images(sample_references(pool, shots, seed))
    skipped += [SkippedFile(path, reason, category) for path, reason in bad]
    if not images:
        raise DatasetError(f"{category}: none of the {shots} drawn references could be read")
    return [p.name for p in paths], images


def at_eval_size(mask: np.ndarray | None, amap: np.ndarray, eval_size: int | None
                 ) -> tuple[np.ndarray | None, np.ndarray]:
    """Mask (nearest) and map (bilinear) at the evaluation size: a square side, or the mask's own (None)."""
    native = mask.shape if mask is not None else amap.shape
    size = (eval_size, eval_size) if eval_size is not None else native
    return (None if mask is None else resize_mask(mask, size)), resize_maps(amap[None], size)[0]


def unit_metrics(labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray | None],
                 maps: list[np.ndarray], fpr_limit: float) -> dict[str, float]:
    """Image metrics over all images, pixel metrics over the images that have ground-truth masks."""
    result = image_metrics(labels, scores)
    with_masks = [i for i, m in enumerate(masks) if m is not None]
    result.update(pixel_metrics([masks[i] for i in with_masks], [maps[i] for i in with_masks], fpr_limit=fpr_limit))
    return result


class EvaluationRunner:
    """Runs one :class:`EvaluationConfig` with detectors made by ``detector_factory``."""

    def __init__(
        self,
        config: EvaluationConfig,
        dataset: AnomalyDataset,
        detector_factory: Callable[[], Detector],
        out_dir: str | Path,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.detector_factory = detector_factory
        self.out_dir = Path(out_dir)
        self.progress = progress

    def _unit_path(self, category: str, shots: int, seed: int) -> Path:
        return self.out_dir / "units" / category / f"k{shots}_s{seed}.json"

    def _check_out_dir(self) -> None:
        """Refuse to mix units of different settings in one folder."""
        marker = self.out_dir / "identity.json"
        identity = json_safe(self.config.identity())
        if marker.is_file():
            previous = json.loads(marker.read_text())
            changed = [k for k in identity if previous.get(k) != identity[k]]
            if changed:
                details = "; ".join(f"{k}: {previous.get(k)!r} → {identity[k]!r}" for k in changed)
                raise ClipfusionError(
                    f"{self.out_dir} holds results of other settings ({details}); "
                    "choose another --out folder or pass --overwrite"
                )
        else:
            _write_atomic(marker, json.dumps(identity, indent=2))

    def run(self) -> dict[str, Any]:
        """Run every unit not yet on disk, then write and return the results."""
        self._check_out_dir()
        records = []
        test_samples: dict[str, list[SampleRef]] = {}
        for category, shots, seed in self.config.units():
            path = self._unit_path(category, shots, seed)
            if path.is_file():
                records.append(json.loads(path.read_text()))
                continue
            if category not in test_samples:
                test_samples[category] = self.dataset.test_samples(category)
            record = self._run_unit(category, shots, seed, test_samples[category])
            _write_atomic(path, json.dumps(json_safe(record)))
            records.append(record)
        return self._write_results(records)

    def _run_unit(self, category: str, shots: int, seed: int, samples: list[SampleRef]) -> dict[str, Any]:
        start = time.perf_counter()
        skipped: list[SkippedFile] = []
        detector = self.detector_factory()
        references, reference_images = load_references(self.dataset, category, shots, seed, skipped)
        if shots > 0:
            detector.fit(reference_images, category)

        scores, maps, masks, rows = [], [], [], []
        bar = tqdm(total=len(samples), desc=f"{category} {shots}-shot seed {seed}", disable=not self.progress)
        for begin in range(0, len(samples), self.config.batch_size):
            batch = load_samples(samples[begin:begin + self.config.batch_size], skipped)
            if batch:
                prediction = detector.predict([s.image for s in batch], category)
                for sample, score, amap in zip(batch, prediction.scores, prediction.maps, strict=True):
                    mask, resized = at_eval_size(sample.mask, amap, self.config.eval_size)
                    maps.append(resized)
                    masks.append(mask)
                    scores.append(float(score))
                    rows.append({"path": sample.path, "category": category, "defect": sample.defect,
                                 "label": sample.label, "score": float(score), "shots": shots, "seed": seed})
            bar.update(len(samples[begin:begin + self.config.batch_size]))
        bar.close()
        if not rows:
            raise DatasetError(f"{category}: no test image could be read")

        labels = np.array([r["label"] for r in rows])
        result = unit_metrics(labels, np.array(scores), masks, maps, self.config.fpr_limit)
        seconds = time.perf_counter() - start
        gallery = self._write_gallery(f"{category}/k{shots}_s{seed}", rows, maps, masks)
        return {
            "category": category, "shots": shots, "seed": seed, "n_images": len(rows),
            "references": references, **result, "seconds": seconds,
            "per_image": rows, "skipped": [asdict(s) for s in skipped], "gallery": gallery,
        }

    def _write_gallery(self, unit: str, rows: list[dict[str, Any]], maps: list[np.ndarray],
                       masks: list[np.ndarray | None]) -> list[dict[str, Any]]:
        """Overlays of the unit's most and least convincing detections, for the report.

        best: the two highest-scored anomalous images; worst: the lowest-scored anomalous image and
        the highest-scored normal one.  One colour scale for all of them: the unit's map range.
        """
        anomalous = sorted((i for i, r in enumerate(rows) if r["label"] == 1), key=lambda i: -rows[i]["score"])
        normal = sorted((i for i, r in enumerate(rows) if r["label"] == 0), key=lambda i: -rows[i]["score"])
        picks = [("best", i) for i in anomalous[:2]]
        if len(anomalous) > 2:
            picks.append(("missed", anomalous[-1]))
        if normal:
            picks.append(("false alarm", normal[0]))
        low = float(min(m.min() for m in maps))
        high = float(max(m.max() for m in maps))
        folder = self.out_dir / "units" / f"{unit}_gallery"
        folder.mkdir(parents=True, exist_ok=True)
        gallery = []
        for rank, (kind, i) in enumerate(picks):
            image = resize_image(read_rgb(rows[i]["path"]), maps[i].shape)
            picture = overlay(image, maps[i], low, high, masks[i])
            name = f"{rank}.jpg"
            (folder / name).write_bytes(thumbnail_jpeg(picture))
            gallery.append({"file": f"units/{unit}_gallery/{name}", "kind": kind, **rows[i]})
        return gallery

    def _write_results(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        runs = [{k: v for k, v in r.items() if k not in ("per_image", "skipped", "gallery")} for r in records]
        summary = summarise(runs)
        results = {
            "config": {**asdict(self.config), "version": __version__,
                       "eval_size": self.config.eval_size or "native",
                       "zero_shot_seeds": "zero-shot runs once, with the first seed"},
            "runs": runs,
            "summary": summary,
            "mean": category_mean(summary),
        }
        results = json_safe(results)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out_dir / "results.json", json.dumps(results, indent=2))
        _write_atomic(self.out_dir / "results.md", render_markdown(results))
        with (self.out_dir / "per_image.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["path", "category", "defect", "label", "score", "shots", "seed"])
            writer.writeheader()
            for record in records:
                writer.writerows(record["per_image"])
        skipped = [s for r in records for s in r["skipped"]]
        skipped_path = self.out_dir / "skipped.csv"
        if skipped:
            with skipped_path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, ["path", "reason", "category"])
                writer.writeheader()
                writer.writerows({k: s[k] for k in ("path", "reason", "category")} for s in skipped)
        elif skipped_path.exists():
            skipped_path.unlink()
        return results


def _nan_stat(values: list[float | None], fn: Callable[[np.ndarray], float]) -> float:
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return float(fn(finite)) if finite.size else float("nan")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (population) standard deviation over seeds, per (category, shots)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["category"], run["shots"]), []).append(run)
    summary = []
    for (category, shots), members in groups.items():
        row: dict[str, Any] = {"category": category, "shots": shots, "n_seeds": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members]
            row[f"{metric}_mean"] = _nan_stat(values, np.mean)
            row[f"{metric}_std"] = _nan_stat(values, np.std)
        summary.append(row)
    return summary


def category_mean(summary: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per shots: the mean over categories of each metric's seed-mean (NaN categories left out)."""
    means: dict[str, dict[str, float]] = {}
    for shots in sorted({row["shots"] for row in summary}):
        rows = [row for row in summary if row["shots"] == shots]
        means[str(shots)] = {m: _nan_stat([r[f"{m}_mean"] for r in rows], np.mean) for m in METRICS}
    return means


def _percent(mean: float | None, std: float | None, with_std: bool) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{100 * mean:.1f}"
    if with_std and std is not None and math.isfinite(std):
        text += f" ± {100 * std:.1f}"
    return text


def render_markdown(results: dict[str, Any]) -> str:
    """Per-shots tables: one row per category (mean ± std over seeds), then the category mean."""
    config = results["config"]
    lines = [
        f"# {config['method']} on {config['dataset']} ({config['root']})",
        "",
        f"Metrics in percent; mean ± std over seeds {config['seeds']} for few-shot; pixel metrics at "
        f"evaluation size {config['eval_size']}; AUPRO integrated to FPR {config['fpr_limit']}.",
    ]
    header = "| category | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    for shots, mean in results["mean"].items():
        rows = [r for r in results["summary"] if str(r["shots"]) == shots]
        lines += ["", f"## {shots}-shot", "", header, rule]
        for r in rows:
            cells = [_percent(r[f"{m}_mean"], r[f"{m}_std"], r["n_seeds"] > 1) for m in METRICS]
            lines.append(f"| {r['category']} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(_percent(mean[m], None, False) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"
