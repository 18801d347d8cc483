"""What one (category, shots, seed) unit needs, shared by the evaluation runner and the sweep: its
references, its test samples (unreadable ones skipped with the reason), maps at the evaluation size,
and its metrics."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipfusion.data import AnomalyDataset, Sample, SampleRef, sample_references
from clipfusion.data.base import MAX_PIXELS, read_images
from clipfusion.errors import DatasetError, ImageReadError
from clipfusion.evaluation.metrics import image_metrics, pixel_metrics
from clipfusion.resampling import resize_maps, resize_mask

logger = logging.getLogger(__name__)


def unit_keys(categories: Sequence[str], shots: Sequence[int], seeds: Sequence[int]) -> list[tuple[str, int, int]]:
    """Every (category, shots, seed) unit; zero-shot runs once per category, with the first seed
    (it draws no references, and a method's own randomness is fixed by its settings)."""
    return [(category, k, seed) for category in categories for k in shots for seed in (seeds if k > 0 else seeds[:1])]


@dataclass
class SkippedFile:
    path: str
    reason: str
    category: str


def load_samples(refs: Sequence[SampleRef], skipped: list[SkippedFile], max_pixels: int = MAX_PIXELS
                 ) -> list[Sample]:
    """Load test samples; an unreadable image is logged, recorded in ``skipped`` and left out."""
    samples = []
    for ref in refs:
        try:
            samples.append(ref.load(max_pixels))
        except ImageReadError as exc:
            logger.warning("skipped %s", exc)
            skipped.append(SkippedFile(exc.path, exc.reason, ref.category))
    return samples


def load_references(dataset: AnomalyDataset, category: str, shots: int, seed: int, skipped: list[SkippedFile],
                    max_pixels: int = MAX_PIXELS) -> tuple[list[str], list[np.ndarray]]:
    """File names and pixels of the ``shots`` references drawn with ``seed`` (none for zero-shot)."""
    if shots == 0:
        return [], []
    pool = dataset.train_images(category)
    if not pool:
        raise DatasetError(f"{category}: no normal training images to draw {shots} references from")
    paths, images, bad = read_images(sample_references(pool, shots, seed), max_pixels)
    skipped += [SkippedFile(path, reason, category) for path, reason in bad]
    if not images:
        raise DatasetError(f"{category}: none of the {shots} drawn references could be read")
    return [p.name for p in paths], images


def at_eval_size(mask: np.ndarray | None, amap: np.ndarray, eval_size: int | None
                 ) -> tuple[np.ndarray | None, np.ndarray]:
    """Mask (nearest) and map (bilinear) at the evaluation size: a square side, or the mask's own (None)."""
    native = mask.shape if mask is not None else amap.shape
    size = (eval_size, eval_size) if eval_size is not None else native
    return (None if mask is None else resize_mask(mask, size)), resize_maps(amap[None], size)[0]


def unit_metrics(labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray | None],
                 maps: list[np.ndarray], fpr_limit: float) -> dict[str, float]:
    """Image metrics over all images, pixel metrics over the images that have ground-truth masks."""
    result = image_metrics(labels, scores)
    with_masks = [i for i, m in enumerate(masks) if m is not None]
    result.update(pixel_metrics([m for m in masks if m is not None], [maps[i] for i in with_masks],
                                fpr_limit=fpr_limit))
    return result
