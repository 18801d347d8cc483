"""Heatmap overlays on a fixed colour scale, and the image encodings outputs use (PNG, small JPEG)."""
from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from clipfusion.geometry import resize_maps, resize_mask

COLORMAP = "jet"


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None,
            opacity: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the map coloured on the fixed scale [vmin, vmax] and blended over the image.

    The scale is the caller's (one per run or dataset), never the image's own min–max, so a normal
    image stays blue.  ``mask`` (H, W) draws the ground-truth outline in white.
    """
    height, width = image.shape[:2]
    resized = resize_maps(anomaly_map[None], (height, width))[0]
    scaled = np.clip((resized - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = colormaps[COLORMAP](scaled)[:, :, :3] * 255.0
    blended = (1.0 - opacity) * image.astype(np.float32) + opacity * heat.astype(np.float32)
    if mask is not None:
        mask = resize_mask(mask, (height, width))
        outline = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(height, width) // 128))
        blended[outline] = 255.0
    return np.clip(blended, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail_jpeg(image: np.ndarray, side: int = 192) -> bytes:
    """A small JPEG of an (H, W, 3) uint8 image, longest side ``side``: keeps reports light."""
    picture = Image.fromarray(image)
    picture.thumbnail((side, side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
