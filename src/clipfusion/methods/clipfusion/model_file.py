"""The inspection model file (``*.cfm``): one safetensors file (no pickle) that holds everything a
fitted CLIPFusion detector needs to run on a line.

Tensors: the memory bank's layers (none for a zero-shot model).  Metadata (JSON strings):
``format`` (``clipfusion-model``), ``model`` (the card below) and ``manifest`` (the bank's own
manifest, so ``predict --memory`` reads the same file).  The card records the preset and every
override, the category and the object name used in prompts, the references (file names and
SHA-256), the image and pixel thresholds and how they were derived from held-out normal images
(never the references), the held-out normal-score statistics behind the normalised score, the
precision (dtype and device kind) the bank and thresholds were computed in, the package version and
the creation time.  Loading checks every field before it is trusted.  Files of format 2 (before the
precision was recorded) still load, as float32 on the CPU, said once.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from clipfusion.config import DTYPES, get_preset
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError, SettingError
from clipfusion.notices import say_once

logger = logging.getLogger(__name__)
FORMAT = "clipfusion-model"
# 2: the thresholds carry the normal pixels' median (the colour scale); 3: the precision they were computed in
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MODEL_SUFFIX = ".cfm"
DEVICE_KINDS = ("cpu", "cuda", "mps")


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
    dtype: str = "float32"  # the precision the bank and thresholds were computed in (format 2: float32)
    device: str = "cpu"  # the kind of device they were computed on (cpu, cuda, mps)

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
        if card.dtype not in DTYPES or card.device not in DEVICE_KINDS:
            raise bad(f"its precision ({card.dtype!r} on {card.device!r}) is not one clipfusion computes in")
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
    readable = {f"{FORMAT}/{version}": version for version in READABLE_VERSIONS}
    if metadata.get("format") not in readable:
        raise ClipfusionError(f"{path} is not a clipfusion model file of format {FORMAT}/{FORMAT_VERSION} (it says "
                              f"{metadata.get('format')!r}); write it with `clipfusion fit --out X{MODEL_SUFFIX}`")
    if readable[metadata["format"]] < 3:
        say_once(logger, logging.WARNING, f"model file {path} is of format {FORMAT}/2, which does not record the "
                                          "precision of its thresholds: taken as float32; `clipfusion calibrate` "
                                          "writes it again with thresholds derived here, in this machine's precision")
    return ModelCard.from_json(metadata.get("model", ""), path)
