"""The report's plots, drawn with matplotlib's object API (no pyplot, no global backend switch)."""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def _figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=180)  # 2x: sharp on high-density screens at 360 px wide
    return buffer.getvalue()


def score_histogram(normal: Sequence[float], anomalous: Sequence[float], title: str) -> bytes:
    fig = Figure(figsize=(4, 2.6))
    ax = fig.subplots()
    values = np.concatenate([np.asarray(normal, float), np.asarray(anomalous, float)])
    bins: int | list[float] = np.linspace(values.min(), values.max() + 1e-9, 20).tolist() if values.size else 10
    ax.hist(normal, bins=bins, alpha=0.6, label="normal", color="tab:blue")
    ax.hist(anomalous, bins=bins, alpha=0.6, label="anomalous", color="tab:red")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("image score", fontsize=8)
    ax.legend(fontsize=8)
    return _figure_png(fig)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> bytes:
    """curves: {label: (fpr, tpr, auroc)}."""
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    for label, (fpr, tpr, value) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} ({100 * value:.1f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate", fontsize=8)
    ax.set_ylabel("true positive rate", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _figure_png(fig)


def metric_vs_shots(series: dict[str, dict[int, float]], title: str) -> bytes:
    """series: {metric: {shots: value}} → one line per metric, percent."""
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    for metric, points in series.items():
        shots = sorted(points)
        ax.plot(shots, [100 * points[k] for k in shots], marker="o", label=metric)
    ax.set_xlabel("shots (normal references)", fontsize=8)
    ax.set_ylabel("percent", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _figure_png(fig)
