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

from safetensors import safe_open

from clipfusion.config import get_preset
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError, SettingError

FORMAT = "clipfusion-model"
FORMAT_VERSION = 2  # 2: the thresholds carry the normal pixels' median (the colour scale)
MODEL_SUFFIX = ".cfm"


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
                   card.thresholds.normal_max, card.thresholds.normal_mean, card.thresholds.normal_std,
                   card.thresholds.pixel_median]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
            raise bad("a threshold or normal statistic is not a finite number")
        if (card.thresholds.n_normals < 1 or card.thresholds.normal_min > card.thresholds.normal_max
                or card.thresholds.pixel_median > card.thresholds.pixel):
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
        # numpy, not pt: the card is read before torch is imported (a one-line error must not wait for it)
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # a truncated or foreign file
        raise ClipfusionError(f"{path} is not a clipfusion model file: {exc}") from None
    if metadata.get("format") != f"{FORMAT}/{FORMAT_VERSION}":
        raise ClipfusionError(f"{path} is not a clipfusion model file of format {FORMAT}/{FORMAT_VERSION} (it says "
                              f"{metadata.get('format')!r}); write it with `clipfusion fit --out X{MODEL_SUFFIX}`")
    return ModelCard.from_json(metadata.get("model", ""), path)
