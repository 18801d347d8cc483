"""What the Python API accepts as an image: a path, a Pillow image or a NumPy array, or a list of them.

Every form becomes (H, W, 3) uint8 RGB, the one format the detectors compute on.  Arrays may be
uint8, uint16 (full 16-bit range), bool, or float in [0, 1]; grayscale (H, W) or (H, W, 1), RGB or
RGBA (alpha dropped).  A 4-D (N, H, W, C) array is N images.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

from clipfusion.data.base import pil_to_rgb, read_rgb
from clipfusion.errors import ClipfusionError

ImageLike: TypeAlias = "str | os.PathLike[str] | Image.Image | np.ndarray"
Images: TypeAlias = "ImageLike | Sequence[ImageLike]"  # one image or many


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """One image array → (H, W, 3) uint8 RGB (see the module docstring for what is accepted)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ClipfusionError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), not {array.shape}")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ClipfusionError("a float image array must hold finite values in [0, 1]; scale it first")
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise ClipfusionError(f"image arrays of dtype {array.dtype} are not supported: give uint8, uint16, bool or float")


def to_rgb(image: ImageLike) -> np.ndarray:
    """One image in any accepted form → (H, W, 3) uint8 RGB."""
    if isinstance(image, str | os.PathLike):
        return read_rgb(Path(image))
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    raise ClipfusionError(f"cannot read {type(image).__name__} as an image: give a path, a PIL image or an array")


def as_rgb_list(images: Images) -> list[np.ndarray]:
    """One image or many, in any accepted form → a list of (H, W, 3) uint8 RGB arrays."""
    if isinstance(images, np.ndarray):
        return [array_to_rgb(a) for a in images] if images.ndim == 4 else [array_to_rgb(images)]
    if isinstance(images, str | os.PathLike | Image.Image):
        return [to_rgb(images)]
    if not isinstance(images, Sequence):
        return [to_rgb(images)]  # not a list of images either: to_rgb names what it got
    return [to_rgb(image) for image in images]
