"""Scoring users' own images: optional references, a threshold, then overlays, raw maps and scores."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion.data.base import read_images, read_rgb
from clipfusion.errors import ClipfusionError
from clipfusion.outputs import csv_text, write_atomic
from clipfusion.overlays import overlay, png_bytes
from clipfusion.protocol import Detector
from clipfusion.tasks.inputs import collect_images, draw_references
from clipfusion.tasks.thresholds import Threshold, resolve_threshold

logger = logging.getLogger(__name__)


def predict_paths(detector: Detector, paths: Sequence[Path], category: str, out: str | Path,
                  threshold: Threshold | None = None, scale: tuple[float, float] | None = None,
                  batch_size: int = 8, progress: bool = True, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score ``paths``; write maps/*.npy, overlays/*.png, scores.csv and scores.json under ``out``.

    The overlay colour scale is ``scale`` or, by default, the min and max over every map of the run:
    one scale for all images, never an image's own min–max.
    """
    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    written: list[tuple[Path, str]] = []
    bar = tqdm(total=len(paths), desc="predict", disable=not progress)
    for begin in range(0, len(paths), batch_size):
        batch_paths, images, bad = read_images(paths[begin:begin + batch_size])
        skipped += bad
        if images:
            start = time.perf_counter()
            prediction = detector.predict(images, category)
            seconds = (time.perf_counter() - start) / len(images)
            for path, score, amap in zip(batch_paths, prediction.scores, prediction.maps, strict=True):
                name = f"{len(written):05d}_{path.stem}"
                np.save(out / "maps" / f"{name}.npy", amap.astype(np.float32))
                written.append((path, name))
                decision = "" if threshold is None else ("anomalous" if score > threshold.value else "normal")
                rows.append({"path": str(path), "score": float(score), "decision": decision,
                             "seconds": round(seconds, 4)})
        bar.update(len(paths[begin:begin + batch_size]))
    bar.close()
    if not rows:
        raise ClipfusionError("none of the images could be read")
    if scale is None:
        maps = [np.load(out / "maps" / f"{name}.npy") for _, name in written]
        scale = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))
    for path, name in tqdm(written, desc="overlays", disable=not progress):
        picture = overlay(read_rgb(path), np.load(out / "maps" / f"{name}.npy"), *scale)
        write_atomic(out / "overlays" / f"{name}.png", png_bytes(picture))
    write_atomic(out / "scores.csv", csv_text(["path", "score", "decision", "seconds"], rows))
    summary = {**(info or {}), "category": category, "scale": list(scale),
               "threshold": None if threshold is None else asdict(threshold),
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "images": rows}
    write_atomic(out / "scores.json", json.dumps(summary, indent=2))
    return summary


@dataclass
class PredictJob:
    """What ``clipfusion predict`` was asked: inputs, optional references, threshold and colour scale."""

    inputs: Sequence[str]
    category: str
    out: str
    method: str = "clipfusion"
    preset: str | None = None
    normal: str | None = None
    shots: int = 0
    seed: int = 0
    memory: str | None = None
    threshold: str | None = None
    scale: str | None = None
    batch_size: int = 8
    progress: bool = True


def parse_scale(text: str | None) -> tuple[float, float] | None:
    """``LOW,HIGH`` → (low, high); None stays None (the run's own range)."""
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ClipfusionError(f"--scale must be LOW,HIGH, not {text!r}") from None
    return low, high


def run_predict(job: PredictJob, detector: Detector) -> tuple[dict[str, Any], Threshold | None]:
    """Fit ``detector`` on drawn references or load a memory bank, set the threshold, score the inputs."""
    if job.memory and job.normal and job.shots:
        raise ClipfusionError("give either --memory or --normal with --shots, not both")
    paths = collect_images(job.inputs)
    scale = parse_scale(job.scale)
    references: list[str] = []
    held_out: list[Path] | None = None
    if job.memory:
        load_memory = getattr(detector, "load_memory", None)
        if load_memory is None:
            raise ClipfusionError(f"--memory works with --method clipfusion, not {job.method}")
        load_memory(job.memory)
        references = detector.memory_bank_.manifest.get("references", [])  # type: ignore[attr-defined]
    if job.normal:
        drawn = draw_references(job.normal, job.shots, job.seed)
        held_out = drawn.held_out
        if drawn.used:
            used, images, _ = read_images(drawn.used)
            detector.fit(images, job.category)
            references = [p.name for p in used]
    threshold = resolve_threshold(job.threshold, detector, job.category, held_out)
    info = {"method": job.method, "preset": job.preset, "references": references}
    summary = predict_paths(detector, paths, job.category, job.out, threshold, scale, job.batch_size,
                            progress=job.progress, info=info)
    return summary, threshold
