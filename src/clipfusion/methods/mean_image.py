"""A simple, non-learned baseline that exercises the whole harness: per-pixel colour distance."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from clipfusion.images import Images, as_rgb_list
from clipfusion.methods.estimator import Estimator
from clipfusion.protocol import Prediction
from clipfusion.resampling import resize_image


class MeanImageDetector(Estimator):
    """Per-pixel RGB distance to the mean of the k normal references.

    Zero-shot (not fitted) it scores each pixel by its distance to the image's own median colour.
    Maps lie in [0, 1] (Euclidean RGB distance / √3), are Gaussian-smoothed with ``sigma`` pixels,
    and the image score is the map's maximum.  It knows nothing about objects or textures: a
    reference point for the harness and a sanity floor, not a method.
    """

    def __init__(self, image_size: int = 256, sigma: float = 2.0) -> None:
        self.image_size = image_size
        self.sigma = sigma

    def _prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        size = (self.image_size, self.image_size)
        return np.stack([resize_image(im, size) for im in images]).astype(np.float32) / 255.0

    def fit(self, images: Images, category: str | None = None) -> MeanImageDetector:
        images = as_rgb_list(images)
        if len(images) == 0:
            raise ValueError("fit needs at least one normal image")
        self.mean_image_ = self._prepare(images).mean(axis=0)
        return self

    def predict(self, images: Images, category: str | None = None) -> Prediction:
        images = as_rgb_list(images)
        batch = self._prepare(images)
        if hasattr(self, "mean_image_"):
            reference = self.mean_image_[None]
        else:
            reference = np.median(batch.reshape(len(batch), -1, 3), axis=1)[:, None, None, :]
        maps = np.linalg.norm(batch - reference, axis=3) / np.sqrt(3.0)
        if self.sigma > 0:
            maps = ndimage.gaussian_filter(maps, sigma=(0, self.sigma, self.sigma))
        maps = maps.astype(np.float32)
        return Prediction(scores=maps.reshape(len(maps), -1).max(axis=1), maps=maps,
                          input_sizes=[(int(image.shape[0]), int(image.shape[1])) for image in images])
