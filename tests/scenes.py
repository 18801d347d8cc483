"""Test scenes with a known defect: a smooth lit surface, optionally a 40 px dark square, and its mask."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from clipfusion.resampling import resize_mask

SIZE = 128


def scene(seed: int, defect: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, lit grey surface; optionally a large dark square (40 px) with its top-left at ``defect``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = 150 + 25 * (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1))
    image = np.repeat(base[:, :, None], 3, axis=2) + rng.normal(0, 2, (SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), bool)
    if defect is not None:
        y, x = defect
        image[y:y + 40, x:x + 40] = (30, 25, 20)
        mask[y:y + 40, x:x + 40] = True
    return np.clip(image, 0, 255).astype(np.uint8), mask


CORNERS = [(4, 4), (4, 84), (84, 4), (84, 84)]


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    resized = np.stack([resize_mask(m, maps.shape[1:]) for m in masks])
    return roc_auc_score(resized.ravel(), maps.ravel())

