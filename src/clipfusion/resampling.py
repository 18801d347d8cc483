"""Resizing images, masks and maps with NumPy and Pillow only (no torch: the exported runtime uses it too).

Maps are resized bilinearly with ``align_corners=False`` and no antialiasing, the convention of
``torch.nn.functional.interpolate`` that the field uses (tests hold the two to 1e-6); masks with
nearest-neighbour sampling (ground truth is never blurred); images bicubically as a whole (no crop,
so maps stay aligned with masks).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def _bilinear_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis: the two source indices and the weight of the second, (out_size,) each.

    The source coordinate of output pixel i is (i + ½)·in/out − ½, clamped at 0 (half-pixel centres).
    """
    scale = np.float32(in_size / out_size)
    source = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                        np.float32(0.0))
    low = np.minimum(source.astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low).astype(np.float32)


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) array → (N, H, W) float32, bilinear, align_corners=False."""
    array = np.asarray(maps, dtype=np.float32)
    if array.shape[1:] == tuple(size):
        return array
    rows_low, rows_high, row_weight = _bilinear_axis(array.shape[1], size[0])
    cols_low, cols_high, col_weight = _bilinear_axis(array.shape[2], size[1])
    top, bottom = array[:, rows_low], array[:, rows_high]  # (N, H, w)
    one = np.float32(1.0)
    upper = (one - col_weight) * top[:, :, cols_low] + col_weight * top[:, :, cols_high]
    lower = (one - col_weight) * bottom[:, :, cols_low] + col_weight * bottom[:, :, cols_high]
    return ((one - row_weight)[:, None] * upper + row_weight[:, None] * lower).astype(np.float32)


def resize_image(image: np.ndarray, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """(H, W, 3) uint8 → (size[0], size[1], 3) uint8; whole image, no crop (keeps mask alignment)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool → (size) bool with nearest-neighbour sampling (ground truth is never blurred)."""
    height, width = size
    if mask.shape == (height, width):
        return mask
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(picture.resize((width, height), Image.Resampling.NEAREST)) > 0


def normalised_pixels(images: list[np.ndarray], size: tuple[int, int], mean: tuple[float, ...],
                      std: tuple[float, ...]) -> np.ndarray:
    """(H, W, 3) uint8 images → (B, 3, size) float32: resized bicubically, scaled to [0, 1], then (x − mean)/std
    per channel: what a model's image input expects."""
    resized = np.stack([resize_image(image, size) for image in images]).astype(np.float32) / np.float32(255.0)
    scaled = (resized - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))
