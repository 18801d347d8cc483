"""The inspection model file (``*.cfm``): one safetensors file (no pickle) that holds everything a
fitted CLIPFusion detector needs to run on a line.

Tensors: the memory bank's layers (none for a zero-shot model).  Metadata (JSON strings):
``format`` (``clipfusion-model``), ``model`` (the card below) and ``manifest`` (the bank's own
manifest, so ``predict --memory`` reads the same file).  The card records the preset and every
override, the category and the object name used in prompts, the references (file names and
SHA-256), the image and pixel thresholds and how they were derived from held-out normal images
(never the references), the held-out normal-score statistics behind the normalised score, the
package version and the creation time.  Loading checks every field before it is trusted.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from clipfusion.config import get_preset
from clipfusion.errors import ClipfusionError, SettingError

FORMAT = "clipfusion-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".cfm"
IMAGE_QUANTILE = 0.99  # of held-out normal image scores: the image threshold
PIXEL_QUANTILE = 0.999  # of all held-out normal pixels: the pixel threshold


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds derived from held-out normal images.

    image: image scores above it are NG.  pixel: map values above it are anomalous pixels.
    normal_min / normal_max: the held-out normal scores' range, which sets the normalised score's
    slope (0.5 at the threshold, as anomalib normalises).  rule: how both were derived; n_normals:
    from how many images.
    """

    image: float
    pixel: float
    normal_min: float
    normal_max: float
    normal_mean: float
    normal_std: float
    rule: str
    n_normals: int

    @classmethod
    def from_normals(cls, scores: np.ndarray, maps: np.ndarray) -> Thresholds:
        """From held-out normal images' scores (N,) and maps (N, H, W)."""
        if len(scores) == 0:
            raise ClipfusionError("no held-out normal image to set the thresholds from: give --normal a folder "
                                  "with more images than --shots")
        if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
            raise ClipfusionError("the held-out normal images' scores are not all finite numbers; check the settings")
        rule = (f"image: {IMAGE_QUANTILE:.0%} quantile (method 'higher') of the held-out normal images' scores; "
                f"pixel: {PIXEL_QUANTILE:.1%} quantile (method 'higher') of all their map values")
        return cls(image=float(np.quantile(scores, IMAGE_QUANTILE, method="higher")),
                   pixel=float(np.quantile(maps, PIXEL_QUANTILE, method="higher")),
                   normal_min=float(scores.min()), normal_max=float(scores.max()), normal_mean=float(scores.mean()),
                   normal_std=float(scores.std()), rule=rule, n_normals=len(scores))

    def normalised(self, scores: np.ndarray) -> np.ndarray:
        """(N,) scores → (N,) in [0, 1]: 0.5 at the image threshold, ±0.5 per normal-score range."""
        span = max(self.normal_max - self.normal_min, 1e-12)
        return np.clip(0.5 + (np.asarray(scores, dtype=np.float64) - self.image) / span, 0.0, 1.0)


@dataclass(frozen=True)
class ModelCard:
    """What a model file says about itself (the ``model`` metadata entry)."""

    preset: str
    overrides: dict[str, Any]
    category: str
    prompt_name: str
    references: list[dict[str, str]]
    thresholds: Thresholds
    version: str
    created: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: Path) -> ModelCard:
        """Parse and check every field; a damaged or tampered card is a one-line error naming it."""
        def bad(what: str) -> ClipfusionError:
            return ClipfusionError(f"model file {source}: {what}; write it again with `clipfusion fit`")

        try:
            data = json.loads(text)
            thresholds = Thresholds(**data.pop("thresholds"))
            card = cls(thresholds=thresholds, **data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise bad(f"its description cannot be read ({exc})") from None
        if not isinstance(card.overrides, dict) or not isinstance(card.references, list):
            raise bad("overrides or references have the wrong shape")
        numbers = [card.thresholds.image, card.thresholds.pixel, card.thresholds.normal_min,
                   card.thresholds.normal_max, card.thresholds.normal_mean, card.thresholds.normal_std]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
            raise bad("a threshold or normal statistic is not a finite number")
        if card.thresholds.n_normals < 1 or card.thresholds.normal_min > card.thresholds.normal_max:
            raise bad("the normal-score statistics are inconsistent")
        try:
            get_preset(card.preset, **card.overrides)
        except (ClipfusionError, SettingError) as exc:
            raise bad(f"its settings are not valid ({exc})") from None
        return card


def read_card(path: Path) -> ModelCard:
    """The card of the model file at ``path`` (no tensor is read, no model is built)."""
    if not path.is_file():
        raise ClipfusionError(f"model file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # a truncated or foreign file
        raise ClipfusionError(f"{path} is not a clipfusion model file: {exc}") from None
    if metadata.get("format") != f"{FORMAT}/{FORMAT_VERSION}":
        raise ClipfusionError(f"{path} is not a clipfusion model file of format {FORMAT}/{FORMAT_VERSION} (it says "
                              f"{metadata.get('format')!r}); write it with `clipfusion fit --out X{MODEL_SUFFIX}`")
    return ModelCard.from_json(metadata.get("model", ""), path)
