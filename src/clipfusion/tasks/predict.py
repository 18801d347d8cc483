"""Scoring users' own images: optional references, a threshold, then overlays, raw maps and scores."""
from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion.data.base import MAX_PIXELS, read_images, read_rgb
from clipfusion.errors import ClipfusionError
from clipfusion.geometry import resize_image
from clipfusion.outputs import csv_text, json_text, write_atomic
from clipfusion.overlays import overlay, png_bytes
from clipfusion.protocol import Detector
from clipfusion.run_folders import check_output_folder, output_folder
from clipfusion.tasks.inputs import collect_images, draw_references
from clipfusion.tasks.thresholds import Threshold, resolve_threshold

logger = logging.getLogger(__name__)
# What predict writes directly in --out (all that --overwrite may delete).
PREDICT_OUTPUTS = ("maps", "overlays", "scores.csv", "scores.json")
# Overlays are drawn at most this many pixels on their longest side: a 100-megapixel frame would
# otherwise need gigabytes for its heatmap.
OVERLAY_MAX_SIDE = 2048


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _bounded(image: np.ndarray) -> np.ndarray:
    """``image`` shrunk (aspect kept) so that its longest side is at most OVERLAY_MAX_SIDE."""
    longest = max(image.shape[:2])
    if longest <= OVERLAY_MAX_SIDE:
        return image
    scale = OVERLAY_MAX_SIDE / longest
    return resize_image(image, (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))))


def predict_paths(detector: Detector, paths: Sequence[Path], category: str, out: str | Path,
                  threshold: Threshold | None = None, scale: tuple[float, float] | None = None,
                  batch_size: int = 8, progress: bool = True, info: dict[str, Any] | None = None,
                  max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Score ``paths``; write maps/*.npy, overlays/*.png, scores.csv and scores.json under ``out``.

    The overlay colour scale is ``scale`` or, by default, the min and max over every map of the run:
    one scale for all images, never an image's own min–max.  An image whose score or map is not
    finite is reported and skipped, never given a decision.
    """
    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    written: list[tuple[Path, str]] = []
    bar = tqdm(total=len(paths), desc="predict", disable=not progress)
    for begin in range(0, len(paths), batch_size):
        batch_paths, images, bad = read_images(paths[begin:begin + batch_size], max_pixels)
        skipped += bad
        if images:
            start = time.perf_counter()
            prediction = detector.predict(images, category)
            seconds = (time.perf_counter() - start) / len(images)
            # a model file's normal-score statistics give a normalised score: 0.5 at its threshold
            thresholds = getattr(detector, "thresholds_", None)
            normalised = thresholds.normalised(prediction.scores) if thresholds else [None] * len(images)
            for path, score, norm, amap in zip(batch_paths, prediction.scores, normalised, prediction.maps,
                                               strict=True):
                if not (math.isfinite(float(score)) and np.isfinite(amap).all()):
                    logger.warning("skipped %s: its score or map is not a finite number (check the settings)", path)
                    skipped.append((os.fsdecode(path), "score or map not finite (NaN or infinity)"))
                    continue
                name = f"{len(written):05d}_{path.stem}"
                write_atomic(out / "maps" / f"{name}.npy", _npy_bytes(amap.astype(np.float32)))
                written.append((path, name))
                decision = "" if threshold is None else ("anomalous" if score > threshold.value else "normal")
                rows.append({"path": os.fsdecode(path), "score": float(score),
                             "normalised_score": None if norm is None else round(float(norm), 6),
                             "decision": decision, "seconds": round(seconds, 4)})
        bar.update(len(paths[begin:begin + batch_size]))
    bar.close()
    if not rows:
        raise ClipfusionError("none of the images could be scored (see the messages above)")
    if scale is None:
        maps = [np.load(out / "maps" / f"{name}.npy") for _, name in written]
        scale = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))
    for path, name in tqdm(written, desc="overlays", disable=not progress):
        picture = overlay(_bounded(read_rgb(path, max_pixels)), np.load(out / "maps" / f"{name}.npy"), *scale)
        write_atomic(out / "overlays" / f"{name}.png", png_bytes(picture))
    write_atomic(out / "scores.csv", csv_text(["path", "score", "normalised_score", "decision", "seconds"], rows))
    summary = {**(info or {}), "category": category, "scale": list(scale),
               "threshold": None if threshold is None else asdict(threshold),
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "images": rows}
    write_atomic(out / "scores.json", json_text(summary))
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
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS


def parse_scale(text: str | None) -> tuple[float, float] | None:
    """``LOW,HIGH`` → (low, high); None stays None (the run's own range)."""
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ClipfusionError(f"--scale must be LOW,HIGH, not {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ClipfusionError(f"--scale needs two finite numbers LOW < HIGH, not {text!r}")
    return low, high


def run_predict(job: PredictJob, detector: Detector) -> tuple[dict[str, Any], Threshold | None]:
    """Fit ``detector`` on drawn references or load a memory bank, set the threshold, score the inputs."""
    if job.memory and job.normal and job.shots:
        raise ClipfusionError("give either --memory or --normal with --shots, not both")
    if job.shots < 0:
        raise ClipfusionError(f"--shots must be >= 0, not {job.shots}")
    if job.shots and not job.normal:
        raise ClipfusionError(f"--shots {job.shots} needs --normal DIR, the folder to draw the references from "
                              "(or use a memory bank from `clipfusion fit` with --memory)")
    if job.seed < 0:
        raise ClipfusionError(f"--seed must be >= 0, not {job.seed}")
    out = Path(job.out)
    # an input folder may hold --out itself (``predict .``): its overlays are outputs, not inputs
    paths = [p for p in collect_images(job.inputs) if out.resolve() not in Path(os.path.realpath(p)).parents]
    if not paths:
        raise ClipfusionError(f"no image files found in {', '.join(job.inputs)} outside --out {out}")
    scale = parse_scale(job.scale)
    inputs = [Path(item).expanduser() for item in job.inputs if Path(item).expanduser().is_dir()]
    check_output_folder(out, "predict", PREDICT_OUTPUTS, protected=inputs)
    if not job.overwrite and out.is_dir() and {p.name for p in out.iterdir()} & set(PREDICT_OUTPUTS):
        raise ClipfusionError(f"--out {out} holds an earlier predict run; pass --overwrite to replace it (only "
                              "clipfusion's own files are deleted) or choose another folder")
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
        # the memory bank's own references are not held out: they would pull an auto threshold down
        held_out = [p for p in drawn.held_out if p.name not in set(references)]
        if drawn.used:
            used, images, _ = read_images(drawn.used, job.max_pixels)
            detector.fit(images, job.category)
            references = [p.name for p in used]
    thresholds = getattr(detector, "thresholds_", None)  # a model file's
    if job.threshold is None and thresholds is not None:
        threshold: Threshold | None = Threshold(thresholds.image, f"from the model file: {thresholds.rule}, over "
                                                                  f"{thresholds.n_normals} held-out normal images")
    else:
        threshold = resolve_threshold(job.threshold, detector, job.category, held_out, job.batch_size, job.progress)
    info = {"method": job.method, "preset": job.preset, "references": references}
    with output_folder(out, "predict", PREDICT_OUTPUTS, job.overwrite, protected=inputs):
        summary = predict_paths(detector, paths, job.category, out, threshold, scale, job.batch_size,
                                progress=job.progress, info=info, max_pixels=job.max_pixels)
    return summary, threshold
