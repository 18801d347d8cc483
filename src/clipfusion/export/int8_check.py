"""How far 8-bit weights move an export's verdicts, measured before the export is kept.

OpenVINO's weight compression (``export --weights int8``) changes the maps (by about 2 % of their
range for ``fast``, docs/deploy.md).  Whether that matters depends on how close the line's normal
images score to the threshold: the thresholds are quantiles of held-out normal scores, so the highest
of them sits right at the image threshold.  The int8 graphs are therefore run on held-out normal
images beside the float32 PyTorch model they came from, and the decisions that flip at the model's
own thresholds are counted; ``clipfusion export`` refuses an int8 export that flips any without
``--force`` (then it warns), and the manifest records the measurement.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.decisions import label
from clipfusion.images import Images
from clipfusion.protocol import Prediction


@dataclass(frozen=True)
class Int8Check:
    """The int8 export against the float32 PyTorch model on the same images."""

    images: int  # scored by both
    what: str  # what they were: "held-out normal images" or "probe images" (no normals given)
    flips: int | None  # decisions that differ at the image threshold (None: no thresholds, zero-shot)
    max_score_difference: float
    max_map_difference: float  # of the PyTorch maps' range

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        flips = "no thresholds to flip" if self.flips is None else f"{self.flips} of {self.images} decisions flipped"
        return (f"int8 weights on {self.images} {self.what}: {flips}, scores moved by up to "
                f"{self.max_score_difference:.4f}, maps by up to {100 * self.max_map_difference:.1f} % of their range")


def measure_int8(expected: Prediction, folder: Path, images: Images, category: str, what: str) -> Int8Check:
    """``folder``'s export (int8, complete with its manifest) on ``images`` against ``expected``, what the
    float32 PyTorch model it came from predicted for them (computed first, so that its weights can be let go
    before OpenVINO expands the 8-bit ones)."""
    from clipfusion.runtime.exported import ExportedDetector

    got = ExportedDetector(folder, dtype="float32").predict(images, category)  # like with like: float32
    spread = max(float(np.ptp(expected.maps)), 1e-12)
    flips, threshold = None, expected.image_threshold  # the model's own, for both
    if threshold is not None:
        flips = sum(label(float(a), threshold) != label(float(b), threshold)
                    for a, b in zip(expected.scores, got.scores, strict=True))
    return Int8Check(len(expected.scores), what, flips,
                     float(np.abs(np.asarray(got.scores) - np.asarray(expected.scores)).max()),
                     float(np.abs(got.maps - expected.maps).max() / spread))
