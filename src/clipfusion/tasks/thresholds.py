"""Decision thresholds on image scores: given by the user, or derived from held-out normal images only."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from clipfusion.data.base import read_images
from clipfusion.errors import ClipfusionError
from clipfusion.methods.clipfusion.model_file import IMAGE_QUANTILE
from clipfusion.protocol import Detector

logger = logging.getLogger(__name__)
AUTO_QUANTILE = IMAGE_QUANTILE  # the model file's image-threshold rule: one rule for both


@dataclass
class Threshold:
    value: float
    how: str


def auto_threshold(normal_scores: np.ndarray) -> Threshold:
    """The 99th percentile (the highest score below 100 images) of normal images' scores."""
    if not np.isfinite(normal_scores).all():
        raise ClipfusionError("the held-out normal images' scores are not all finite numbers; check the settings")
    if len(normal_scores) == 0:
        raise ClipfusionError("--threshold auto needs held-out normal images: give --normal DIR with more images "
                              "than --shots")
    value = float(np.quantile(normal_scores, AUTO_QUANTILE, method="higher"))
    return Threshold(value, f"99th percentile (method 'higher') of the scores of {len(normal_scores)} held-out "
                            "normal images: images scoring above it are flagged")


def resolve_threshold(spec: str | None, detector: Detector, category: str, held_out: Sequence[Path] | None,
                      batch_size: int = 8, progress: bool = False) -> Threshold | None:
    """``spec`` is None (no decisions), a number, or ``auto``: :func:`auto_threshold` over the scores
    of the ``held_out`` normal images (None: no folder of normals was given)."""
    if spec is None:
        return None
    if spec != "auto":
        try:
            value = float(spec)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ClipfusionError(f"--threshold must be a finite number or 'auto', not {spec!r}")
        return Threshold(value, "given with --threshold")
    if held_out is None:
        raise ClipfusionError("--threshold auto needs --normal DIR: normal images to set it from")
    scores = []
    for start in tqdm(range(0, len(held_out), batch_size), desc="threshold (held-out normals)", disable=not progress):
        _, images, _ = read_images(held_out[start:start + batch_size])
        if images:
            scores.append(detector.predict(images, category).scores)
    threshold = auto_threshold(np.concatenate(scores) if scores else np.array([]))
    logger.info("threshold %.4f: %s", threshold.value, threshold.how)
    return threshold
