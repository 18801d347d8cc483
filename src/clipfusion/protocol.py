"""The detector protocol every method implements, and what ``predict`` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clipfusion.decisions import Region, find_regions, label
from clipfusion.images import Images
from clipfusion.resampling import resize_maps


@dataclass
class Prediction:
    """Output of ``Detector.predict`` for N images.

    scores: (N,) float32 image-level anomaly scores.  maps: (N, H, W) float32 pixel anomaly maps at
    the detector's output size.  Higher = more anomalous for both; values are comparable across
    images (no per-image normalisation).  branch_maps: optional named (N, h, w) maps for analysis.
    input_sizes: each input image's (height, width), for :meth:`maps_at_input_size`.
    image_threshold / pixel_threshold: a calibrated detector's (``CLIPFusion.load`` of a model
    file, or ``calibrate``), for :meth:`labels` and :meth:`regions`; None without.
    """

    scores: np.ndarray
    maps: np.ndarray
    branch_maps: dict[str, np.ndarray] = field(default_factory=dict)
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    image_threshold: float | None = None
    pixel_threshold: float | None = None

    def maps_at_input_size(self) -> list[np.ndarray]:
        """Each map resized (bilinear) to its input image's own (height, width): pixel i, j of map k
        belongs to pixel i, j of image k."""
        if len(self.input_sizes) != len(self.maps):
            raise ValueError("this prediction does not record its input sizes")
        return [resize_maps(amap[None], size)[0] for amap, size in zip(self.maps, self.input_sizes, strict=True)]

    def labels(self) -> list[str]:
        """"NG" or "OK" per image, from the image threshold."""
        if self.image_threshold is None:
            raise ValueError("no image threshold: load a model file (CLIPFusion.load) or calibrate the detector")
        return [label(float(score), self.image_threshold) for score in self.scores]

    def regions(self, min_area: int = 1) -> list[list[Region]]:
        """Per image, its anomalous regions in its own pixels (``decisions.find_regions`` on the map at
        the image's size, above the pixel threshold, at least ``min_area`` pixels), highest peak first."""
        if self.pixel_threshold is None:
            raise ValueError("no pixel threshold: load a model file (CLIPFusion.load) or calibrate the detector")
        return [find_regions(amap, self.pixel_threshold, min_area)[1] for amap in self.maps_at_input_size()]

    def __post_init__(self) -> None:
        if self.maps.ndim != 3 or self.scores.shape != (self.maps.shape[0],):
            raise ValueError(f"scores {self.scores.shape} and maps {self.maps.shape} must be (N,) and (N, H, W)")


@runtime_checkable
class Detector(Protocol):
    """Anything the evaluation runner can score: fitted on normal images (few-shot) or not (zero-shot).

    Images are paths, Pillow images or arrays of any size (``clipfusion.images``), one or a list.
    ``predict``'s category may be None: the one fitted (or loaded), else the detector's default.
    ``get_params()`` returns the constructor's arguments (scikit-learn's convention).
    """

    def fit(self, images: Images, category: str) -> Detector: ...

    def predict(self, images: Images, category: str | None = None) -> Prediction: ...

    def get_params(self) -> dict[str, Any]: ...


def describe(detector: Detector) -> dict[str, Any]:
    """A detector's settings in full, as result files record them: its ``describe()``, or its
    ``get_params()`` for a detector of the user's own without one."""
    method = getattr(detector, "describe", None)
    return method() if callable(method) else detector.get_params()
