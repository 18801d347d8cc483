"""Scoring users' own images: collect files, fit references, choose a threshold, write overlays and scores."""
from __future__ import annotations

import csv
import glob
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion.api import Detector
from clipfusion.data.base import IMAGE_EXTENSIONS, read_images, read_rgb, sample_references
from clipfusion.errors import ClipfusionError
from clipfusion.viz import overlay, png_bytes

logger = logging.getLogger(__name__)
AUTO_QUANTILE = 0.99


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from files, folders (recursive) and glob patterns, in the given order, without repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise ClipfusionError(f"no image files found at {item}")
        found += [m for m in matches if m.suffix.lower() in IMAGE_EXTENSIONS or path.is_file()]
    return list(dict.fromkeys(found))


@dataclass
class References:
    """Few-shot references drawn from a folder of normal images, and the normal images held out."""

    used: list[Path]
    held_out: list[Path]


def draw_references(normal_dir: str | Path, shots: int, seed: int) -> References:
    pool = collect_images([str(normal_dir)])
    used = sample_references(pool, shots, seed) if shots > 0 else []
    return References(used, [p for p in pool if p not in set(used)])


@dataclass
class Threshold:
    value: float
    how: str


def auto_threshold(normal_scores: np.ndarray) -> Threshold:
    """The 99th percentile (the highest score below 100 images) of normal images' scores."""
    if len(normal_scores) == 0:
        raise ClipfusionError("--threshold auto needs held-out normal images: give --normal DIR with more images "
                              "than --shots")
    value = float(np.quantile(normal_scores, AUTO_QUANTILE, method="higher"))
    return Threshold(value, f"99th percentile (method 'higher') of the scores of {len(normal_scores)} held-out "
                            "normal images: images scoring above it are flagged")


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    with (out / "scores.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "score", "decision", "seconds"])
        writer.writeheader()
        writer.writerows(rows)


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
        (out / "overlays" / f"{name}.png").write_bytes(png_bytes(picture))
    _write_rows(out, rows)
    summary = {**(info or {}), "category": category, "scale": list(scale),
               "threshold": None if threshold is None else asdict(threshold),
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "images": rows}
    (out / "scores.json").write_text(json.dumps(summary, indent=2))
    return summary
