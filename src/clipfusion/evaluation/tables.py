"""Summaries of evaluation runs: mean and std over seeds, mean over categories, Markdown tables in percent."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from clipfusion.evaluation.metrics import IMAGE_METRICS, PIXEL_METRICS

METRICS = IMAGE_METRICS + PIXEL_METRICS
METRIC_TITLES = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max",
    "pixel_aupro": "AUPRO", "pixel_aupro_legacy": "AUPRO-legacy",
}


def _nan_stat(values: list[float | None], fn: Callable[[np.ndarray], float]) -> float:
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return float(fn(finite)) if finite.size else float("nan")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (population) standard deviation over seeds, per (category, shots)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["category"], run["shots"]), []).append(run)
    summary = []
    for (category, shots), members in groups.items():
        row: dict[str, Any] = {"category": category, "shots": shots, "n_seeds": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members]
            row[f"{metric}_mean"] = _nan_stat(values, np.mean)
            row[f"{metric}_std"] = _nan_stat(values, np.std)
        summary.append(row)
    return summary


def category_mean(summary: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per shots: the mean over categories of each metric's seed-mean (NaN categories left out)."""
    means: dict[str, dict[str, float]] = {}
    for shots in sorted({row["shots"] for row in summary}):
        rows = [row for row in summary if row["shots"] == shots]
        means[str(shots)] = {m: _nan_stat([r[f"{m}_mean"] for r in rows], np.mean) for m in METRICS}
    return means


def _percent(mean: float | None, std: float | None, with_std: bool) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{100 * mean:.1f}"
    if with_std and std is not None and math.isfinite(std):
        text += f" ± {100 * std:.1f}"
    return text


def render_markdown(results: dict[str, Any]) -> str:
    """Per-shots tables: one row per category (mean ± std over seeds), then the category mean."""
    config = results["config"]
    lines = [
        f"# {config['method']} on {config['dataset']} ({config['root']})",
        "",
        f"Metrics in percent; mean ± std over seeds {config['seeds']} for few-shot; pixel metrics at "
        f"evaluation size {config['eval_size']}; AUPRO integrated to FPR {config['fpr_limit']}.",
    ]
    header = "| category | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    for shots, mean in results["mean"].items():
        rows = [r for r in results["summary"] if str(r["shots"]) == shots]
        lines += ["", f"## {shots}-shot", "", header, rule]
        for r in rows:
            cells = [_percent(r[f"{m}_mean"], r[f"{m}_std"], r["n_seeds"] > 1) for m in METRICS]
            lines.append(f"| {r['category']} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(_percent(mean[m], None, False) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"
