"""The detector protocol every method implements, and what ``predict`` returns."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Prediction:
    """Output of ``Detector.predict`` for N images.

    scores: (N,) float32 image-level anomaly scores.  maps: (N, H, W) float32 pixel anomaly maps at
    the detector's output size.  Higher = more anomalous for both; values are comparable across
    images (no per-image normalisation).  branch_maps: optional named (N, h, w) maps for analysis.
    """

    scores: np.ndarray
    maps: np.ndarray
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.maps.ndim != 3 or self.scores.shape != (self.maps.shape[0],):
            raise ValueError(f"scores {self.scores.shape} and maps {self.maps.shape} must be (N,) and (N, H, W)")


@runtime_checkable
class Detector(Protocol):
    """Anything the evaluation runner can score: fitted on normal images (few-shot) or not (zero-shot).

    Images are (H, W, 3) uint8 RGB arrays of any size.
    """

    def fit(self, images: Sequence[np.ndarray], category: str) -> Detector: ...

    def predict(self, images: Sequence[np.ndarray], category: str) -> Prediction: ...

    def get_params(self) -> dict[str, Any]: ...
