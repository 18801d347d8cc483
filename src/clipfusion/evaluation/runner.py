"""The evaluation runner: categories × shots × seeds → metrics, resumable, written to a folder.

Each finished (category, shots, seed) unit is stored as ``units/<category>/k<shots>_s<seed>.json``
(written atomically), and skipped when the same command runs again, so an interrupted run loses
at most the unit in flight.  Zero-shot runs once (with the first seed): it has no references to
draw, and a method's own randomness is fixed by its settings.

Output files: ``results.json`` (config, runs, summary, mean), ``results.md`` (tables, percent),
``per_image.csv`` (one row per scored image), and ``skipped.csv`` when some files could not be read.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion import __version__
from clipfusion.data import AnomalyDataset, SampleRef
from clipfusion.data.base import MAX_PIXELS, check_path_component
from clipfusion.errors import ClipfusionError, DatasetError
from clipfusion.evaluation.gallery import write_gallery
from clipfusion.evaluation.tables import category_mean, render_markdown, summarise
from clipfusion.evaluation.units import (
    SkippedFile,
    at_eval_size,
    load_references,
    load_samples,
    unit_keys,
    unit_metrics,
)
from clipfusion.outputs import csv_text, json_safe, json_text, read_json, write_atomic
from clipfusion.protocol import Detector

# Settings that make two runs' units interchangeable; anything else may change between resumes.
_IDENTITY_KEYS = ("dataset", "root", "method", "method_params", "eval_size", "fpr_limit")
# Detector settings that cannot change a result: they may differ between an interrupted run and its resume.
_NOT_IDENTITY = ("batch_size", "runtime.offline", "runtime.cache_dir", "runtime.hub_timeout")
# What an evaluation writes directly in its --out folder (all that --overwrite may delete).
EVALUATE_OUTPUTS = ("identity.json", "units", "results.json", "results.md", "per_image.csv", "skipped.csv",
                    "report.html")


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} of nested dicts, so that a difference is named down to the setting."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


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
    max_pixels: int = MAX_PIXELS

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share, flattened to ``group.field`` keys."""
        leaves = _leaves(json_safe({key: getattr(self, key) for key in _IDENTITY_KEYS}))
        return {k: v for k, v in leaves.items() if k.removeprefix("method_params.") not in _NOT_IDENTITY}

    def units(self) -> list[tuple[str, int, int]]:
        return unit_keys(self.categories, self.shots, self.seeds)


# Runs the given units of a runner (each with ``runner.run_unit``), yielding each record as it is written.
UnitEngine = Callable[["EvaluationRunner", list[tuple[str, int, int]]], Iterator[dict[str, Any]]]


def run_units_here(runner: EvaluationRunner, units: list[tuple[str, int, int]]) -> Iterator[dict[str, Any]]:
    """The local engine: the units one after the other, in this process."""
    for unit in units:
        yield runner.run_unit(*unit)


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
        return self.out_dir / "units" / check_path_component(category, "category") / f"k{shots}_s{seed}.json"

    def _check_out_dir(self) -> None:
        """Refuse to mix units of different settings in one folder."""
        marker = self.out_dir / "identity.json"
        identity = self.config.identity()
        if marker.is_file():
            previous = read_json(marker, "the run identity")
            previous = _leaves(previous) if isinstance(previous, dict) else {}
            changed = sorted(k for k in identity.keys() | previous.keys()
                             if k.removeprefix("method_params.") not in _NOT_IDENTITY
                             and previous.get(k) != identity.get(k))
            if changed:
                details = "; ".join(f"{k}: {previous.get(k)!r} → {identity.get(k)!r}" for k in changed)
                raise ClipfusionError(
                    f"{self.out_dir} holds results of other settings ({details}); "
                    "choose another --out folder or pass --overwrite"
                )
        else:
            write_atomic(marker, json_text(identity))

    def pending_units(self) -> list[tuple[str, int, int]]:
        """The units not yet on disk (checking first that ``out_dir`` holds results of these settings)."""
        self._check_out_dir()
        return [unit for unit in self.config.units() if not self._unit_path(*unit).is_file()]

    def run(self, engine: UnitEngine | None = None) -> dict[str, Any]:
        """Run every unit not yet on disk (one after the other here, or with ``engine``), then write and
        return the results."""
        pending = self.pending_units()
        bar = tqdm(total=len(pending), desc="units", disable=not (self.progress and engine))  # local: a bar per unit
        for _ in (engine or run_units_here)(self, pending):
            bar.update()
        bar.close()
        records = [read_json(self._unit_path(*unit), "the finished unit") for unit in self.config.units()]
        return self._write_results(records)

    def run_unit(self, category: str, shots: int, seed: int) -> dict[str, Any]:
        """Run one unit and write it to ``units/`` (atomically); its record."""
        record = self._run_unit(category, shots, seed, self.dataset.test_samples(category))
        write_atomic(self._unit_path(category, shots, seed), json_text(record))
        return record

    def _run_unit(self, category: str, shots: int, seed: int, samples: list[SampleRef]) -> dict[str, Any]:
        start = time.perf_counter()
        skipped: list[SkippedFile] = []
        detector = self.detector_factory()
        references, reference_images = load_references(self.dataset, category, shots, seed, skipped,
                                                       self.config.max_pixels)
        if shots > 0:
            detector.fit(reference_images, category)

        scores, maps, masks, rows = [], [], [], []
        bar = tqdm(total=len(samples), desc=f"{category} {shots}-shot seed {seed}", disable=not self.progress)
        for begin in range(0, len(samples), self.config.batch_size):
            batch = load_samples(samples[begin:begin + self.config.batch_size], skipped, self.config.max_pixels)
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
        gallery = write_gallery(self.out_dir, f"{category}/k{shots}_s{seed}", rows, maps, masks)
        return {
            "category": category, "shots": shots, "seed": seed, "n_images": len(rows),
            "references": references, **result, "seconds": seconds,
            "per_image": rows, "skipped": [asdict(s) for s in skipped], "gallery": gallery,
        }

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
        write_atomic(self.out_dir / "results.json", json_text(results))
        write_atomic(self.out_dir / "results.md", render_markdown(results))
        rows = [row for record in records for row in record["per_image"]]
        write_atomic(self.out_dir / "per_image.csv",
                     csv_text(["path", "category", "defect", "label", "score", "shots", "seed"], rows))
        skipped = [s for r in records for s in r["skipped"]]
        skipped_path = self.out_dir / "skipped.csv"
        if skipped:
            write_atomic(skipped_path, csv_text(["path", "reason", "category"],
                                                ({k: s[k] for k in ("path", "reason", "category")} for s in skipped)))
        elif skipped_path.exists():
            skipped_path.unlink()
        return results
