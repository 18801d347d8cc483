"""From maps to what a line acts on: thresholds derived from held-out normal images, OK/NG labels,
anomalous regions (connected components above the pixel threshold) and their masks."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from clipfusion.errors import ClipfusionError

IMAGE_QUANTILE = 0.99  # of held-out normal image scores: the image threshold
PIXEL_QUANTILE = 0.999  # of all held-out normal pixels: the pixel threshold
OK, NG = "OK", "NG"


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds derived from held-out normal images.

    image: image scores above it are NG.  pixel: map values above it are anomalous pixels.
    normal_min / normal_max: the held-out normal scores' range, which sets the normalised score's
    slope (0.5 at the threshold, as anomalib normalises).  pixel_median: the median of every
    held-out normal map value, the bottom of the overlays' colour scale.  rule: how all were
    derived; n_normals: from how many images.
    """

    image: float
    pixel: float
    normal_min: float
    normal_max: float
    normal_mean: float
    normal_std: float
    pixel_median: float
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
                   normal_std=float(scores.std()), pixel_median=float(np.median(maps)), rule=rule,
                   n_normals=len(scores))

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Thresholds:
        """:meth:`from_normals` over batches of (scores (n,), maps (n, H, W)) as a detector yields them."""
        scores, maps = [], []
        for batch_scores, batch_maps in batches:
            scores.append(batch_scores)
            maps.append(batch_maps)
        return cls.from_normals(np.concatenate(scores) if scores else np.array([]),
                                np.concatenate(maps) if maps else np.zeros((0, 1, 1)))

    def normalised(self, scores: np.ndarray) -> np.ndarray:
        """(N,) scores → (N,) in [0, 1]: 0.5 at the image threshold, ±0.5 per normal-score range."""
        span = max(self.normal_max - self.normal_min, 1e-12)
        return np.clip(0.5 + (np.asarray(scores, dtype=np.float64) - self.image) / span, 0.0, 1.0)

    @property
    def colour_scale(self) -> tuple[float, float]:
        """The overlays' fixed colour scale: from the normal pixels' median (blue) to as far above the
        pixel threshold as the median is below it, so the threshold sits mid-scale.  One scale per
        model, whatever images a run holds."""
        span = max(self.pixel - self.pixel_median, 1e-6)
        return self.pixel - span, self.pixel + span


def label(score: float, image_threshold: float) -> str:
    """NG when the score is above the image threshold, OK otherwise."""
    return NG if score > image_threshold else OK


@dataclass(frozen=True)
class Region:
    """One anomalous region of an image, in that image's own pixels.

    x, y: top-left corner of the bounding box (column, row); width, height: its size; area: the
    region's pixel count; peak: the highest map value inside it.
    """

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float


def find_regions(anomaly_map: np.ndarray, pixel_threshold: float, min_area: int = 1) -> tuple[np.ndarray, list[Region]]:
    """The regions of an (H, W) map at its image's own size: 8-connected components of the pixels
    above ``pixel_threshold`` with at least ``min_area`` pixels, highest peak first, and the (H, W)
    bool mask of exactly those components."""
    above = anomaly_map > pixel_threshold
    labels, count = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(above), []
    indices = np.arange(1, count + 1)
    inside = labels[above]  # only the labelled pixels: ndimage.maximum sorts the whole map (seconds at 4 MP)
    areas = np.bincount(inside, minlength=count + 1)[1:]
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, inside, anomaly_map[above])
    peaks = peaks[1:]
    kept = np.zeros(count + 1, dtype=bool)
    regions = []
    for index, box, area, peak in zip(indices, ndimage.find_objects(labels), areas, peaks, strict=True):
        if area < min_area:
            continue
        kept[index] = True
        rows, cols = box
        regions.append(Region(x=cols.start, y=rows.start, width=cols.stop - cols.start,
                              height=rows.stop - rows.start, area=int(area), peak=float(peak)))
    regions.sort(key=lambda region: -region.peak)
    return kept[labels], regions
