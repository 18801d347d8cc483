"""Pictures: heatmap overlays with a fixed colour scale, and the report's plots."""
from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from clipfusion.imageops import resize_maps, resize_mask

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
    blended = (1.0 - opacity) * image.astype(np.float64) + opacity * heat
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
    picture.thumbnail((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _figure_png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def score_histogram(normal: Sequence[float], anomalous: Sequence[float], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(4, 2.6))
    values = np.concatenate([np.asarray(normal, float), np.asarray(anomalous, float)])
    bins = np.linspace(values.min(), values.max() + 1e-9, 20) if values.size else 10
    ax.hist(normal, bins=bins, alpha=0.6, label="normal", color="tab:blue")
    ax.hist(anomalous, bins=bins, alpha=0.6, label="anomalous", color="tab:red")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("image score", fontsize=8)
    ax.legend(fontsize=7)
    return _figure_png(fig)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> bytes:
    """curves: {label: (fpr, tpr, auroc)}."""
    fig, ax = plt.subplots(figsize=(4, 3))
    for label, (fpr, tpr, value) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} ({100 * value:.1f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate", fontsize=8)
    ax.set_ylabel("true positive rate", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    return _figure_png(fig)


def metric_vs_shots(series: dict[str, dict[int, float]], title: str) -> bytes:
    """series: {metric: {shots: value}} → one line per metric, percent."""
    fig, ax = plt.subplots(figsize=(4, 3))
    for metric, points in series.items():
        shots = sorted(points)
        ax.plot(shots, [100 * points[k] for k in shots], marker="o", label=metric)
    ax.set_xlabel("shots (normal references)", fontsize=8)
    ax.set_ylabel("percent", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _figure_png(fig)
