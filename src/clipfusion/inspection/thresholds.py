"""How an inspection decides: thresholds from a model file, given by the user, or derived from held-out
normal images only (never the references), and the overlays' colour scale.  The one place thresholds
are derived from image files (``derive_thresholds``: fit, calibrate, ``predict --threshold auto`` and the
service's learning all call it)."""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from clipfusion.data.base import MAX_PIXELS
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError
from clipfusion.images import ImageLike
from clipfusion.inspection.fingerprint import NormalScore
from clipfusion.inspection.sources import read_sources
from clipfusion.outputs import file_sha256
from clipfusion.protocol import Detector

logger = logging.getLogger(__name__)
# Without thresholds the colour scale is the language maps' own range: they are probabilities.
DEFAULT_SCALE = (0.0, 1.0)


@dataclass(frozen=True)
class Decisions:
    """What turns a map into outputs.  image: the image threshold (None: no OK/NG); pixel: the pixel
    threshold (None: no regions or masks); how: where they came from; scale: the overlays' fixed
    colour scale; normal: the held-out normal statistics behind the normalised score (or None)."""

    image: float | None
    pixel: float | None
    how: str
    scale: tuple[float, float]
    normal: Thresholds | None = None


@dataclass(frozen=True)
class ScoredNormals:
    """Thresholds derived from held-out normal images, and each scored image's source and score."""

    thresholds: Thresholds
    sources: list[str]
    scores: list[float]

    def fingerprint_entries(self) -> list[NormalScore]:
        """The scored images that are local files, as a fingerprint records them (name, SHA-256, score)."""
        return [NormalScore(Path(source).name, file_sha256(Path(source)), score)
                for source, score in zip(self.sources, self.scores, strict=True) if Path(source).is_file()]


def score_normals(detector: Detector, normals: Sequence[ImageLike], category: str | None = None,
                  batch_size: int = 8, max_pixels: int = MAX_PIXELS, progress: bool = False) -> ScoredNormals:
    """:class:`Thresholds` from the scores and maps of the held-out ``normals`` (paths, URIs or images),
    read and scored one batch at a time; an unreadable or too large image is left out, said in the log."""
    sources: list[str] = []
    scores: list[float] = []

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in tqdm(range(0, len(normals), batch_size), desc="thresholds (held-out normals)",
                          disable=not progress):
            decoded = read_sources(normals[start:start + batch_size], max_pixels)
            for item in decoded:
                if item.image is None:
                    logger.warning("left out of the thresholds: %s (%s)", item.source, item.reason)
            read = [(item.source, item.image) for item in decoded if item.image is not None]
            if read:
                prediction = detector.predict([image for _, image in read], category)
                sources.extend(str(source) for source, _ in read)
                scores.extend(float(score) for score in prediction.scores)
                yield prediction.scores, prediction.maps

    thresholds = Thresholds.from_batches(batches())
    return ScoredNormals(thresholds, sources, scores)


def derive_thresholds(detector: Detector, normals: Sequence[ImageLike], category: str | None = None,
                      batch_size: int = 8, max_pixels: int = MAX_PIXELS, progress: bool = False) -> Thresholds:
    """The thresholds of :func:`score_normals`."""
    return score_normals(detector, normals, category, batch_size, max_pixels, progress).thresholds


def parse_scale(text: str | None) -> tuple[float, float] | None:
    """``LOW,HIGH`` → (low, high); None stays None."""
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ClipfusionError(f"--scale must be LOW,HIGH, not {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ClipfusionError(f"--scale needs two finite numbers LOW < HIGH, not {text!r}")
    return low, high


def parse_threshold(spec: str | None) -> float | str | None:
    """``--threshold``: None, ``"auto"``, or a finite number."""
    if spec is None or spec == "auto":
        return spec
    try:
        value = float(spec)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ClipfusionError(f"--threshold must be a finite number or 'auto', not {spec!r}")
    return value


def check_decision_options(spec: str | None, scale_text: str | None, normal: str | None) -> None:
    """The one-line errors of :func:`resolve_decisions`'s options, raised before any model loads."""
    parse_scale(scale_text)
    if parse_threshold(spec) == "auto" and normal is None:
        raise ClipfusionError("--threshold auto needs --normal DIR: normal images to set it from")


def resolve_decisions(spec: str | None, scale_text: str | None, model: Thresholds | None, detector: Detector | None,
                      category: str | None, held_out: Sequence[Path] | None, batch_size: int = 8,
                      progress: bool = False, max_pixels: int = MAX_PIXELS) -> Decisions:
    """``spec`` is None (the model file's thresholds, or no decisions), a number (the image threshold;
    a model file still gives the pixel threshold) or ``auto``: :func:`derive_thresholds` over the
    ``held_out`` normal images (None: no folder of normals was given)."""
    scale = parse_scale(scale_text)
    threshold = parse_threshold(spec)
    if isinstance(threshold, float):
        # the normalised score is 0.5 at the threshold that decides, this one (the model's normal range kept)
        return Decisions(threshold, model.pixel if model else None, "given with --threshold",
                         scale or (model.colour_scale if model else DEFAULT_SCALE),
                         dataclasses.replace(model, image=threshold) if model else None)
    if threshold == "auto":
        if held_out is None or detector is None:
            raise ClipfusionError("--threshold auto needs --normal DIR: normal images to set it from")
        model = derive_thresholds(detector, held_out, category, batch_size, max_pixels, progress)
        how = f"derived in this run: {model.rule}, over {model.n_normals} held-out normal images"
        logger.info("image threshold %.4f, pixel threshold %.4f: %s", model.image, model.pixel, how)
    elif model is not None:
        how = f"from the model file: {model.rule}, over {model.n_normals} held-out normal images"
    else:
        return Decisions(None, None, "no threshold", scale or DEFAULT_SCALE)
    return Decisions(model.image, model.pixel, how, scale or model.colour_scale, model)
