"""The detector protocol every method implements, and what ``predict`` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clipfusion.geometry import resize_maps
from clipfusion.images import Images


@dataclass
class Prediction:
    """Output of ``Detector.predict`` for N images.

    scores: (N,) float32 image-level anomaly scores.  maps: (N, H, W) float32 pixel anomaly maps at
    the detector's output size.  Higher = more anomalous for both; values are comparable across
    images (no per-image normalisation).  branch_maps: optional named (N, h, w) maps for analysis.
    input_sizes: each input image's (height, width), for :meth:`maps_at_input_size`.
    """

    scores: np.ndarray
    maps: np.ndarray
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)
    input_sizes: list[tuple[int, int]] = field(default_factory=list)

    def maps_at_input_size(self) -> list[np.ndarray]:
        """Each map resized (bilinear) to its input image's own (height, width): pixel i, j of map k
        belongs to pixel i, j of image k."""
        if len(self.input_sizes) != len(self.maps):
            raise ValueError("this prediction does not record its input sizes")
        return [resize_maps(amap[None], size)[0] for amap, size in zip(self.maps, self.input_sizes, strict=True)]

    def __post_init__(self) -> None:
        if self.maps.ndim != 3 or self.scores.shape != (self.maps.shape[0],):
            raise ValueError(f"scores {self.scores.shape} and maps {self.maps.shape} must be (N,) and (N, H, W)")


@runtime_checkable
class Detector(Protocol):
    """Anything the evaluation runner can score: fitted on normal images (few-shot) or not (zero-shot).

    Images are paths, Pillow images or arrays of any size (``clipfusion.images``), one or a list.
    """

    def fit(self, images: Images, category: str) -> Detector: ...

    def predict(self, images: Images, category: str) -> Prediction: ...

    def get_params(self) -> dict[str, Any]: ...
