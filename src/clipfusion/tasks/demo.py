"""``clipfusion demo``: CLIPFusion, WinCLIP and the mean-image baseline on the synthetic data, 0/1-shot."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipfusion.config import get_preset, user_cache_dir
from clipfusion.data.base import MAX_PIXELS
from clipfusion.data.synthetic import ensure_synthetic
from clipfusion.encoders.loading import weights_cached
from clipfusion.evaluation.report import write_report
from clipfusion.evaluation.tables import METRIC_TITLES
from clipfusion.run_folders import output_folder
from clipfusion.tasks.evaluate import run_evaluation

logger = logging.getLogger(__name__)
DEMO_METHODS = ("clipfusion", "winclip", "mean-image")
DEMO_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def default_data_dir() -> Path:
    """Where the demo keeps its synthetic data: ``$XDG_CACHE_HOME/clipfusion`` or ``~/.cache/clipfusion``."""
    return user_cache_dir("synthetic-v1")


def demo_preset(asked: str, cache_dir: str | None) -> str:
    """``auto`` → paper-recon when its weights are in the local cache, else tiny."""
    if asked != "auto":
        return asked
    paper = get_preset("paper-recon")
    return "paper-recon" if weights_cached(paper.clip, paper.diffusion, cache_dir) else "tiny"


def tiny_notice(chosen_by_user: bool) -> str:
    why = ("you chose" if chosen_by_user else
           "the real CLIP / Stable Diffusion weights are not in the local Hugging Face cache, so this demo runs")
    return (f"\n  NOTE: {why} the 'tiny' preset:\n"
            "  untrained random models of the same architecture. Their scores are\n"
            "  MEANINGLESS — the demo shows the pipeline, not the method's accuracy. To get the real models, run\n"
            "  once with internet access `clipfusion demo --preset paper-recon` (downloads ~5 GB into the\n"
            "  Hugging Face cache), or see README → Models and weights for offline copies.\n")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def summary_table(means: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """Markdown: one row per (method, shots), the demo's metrics in percent."""
    lines = ["| method | shots | " + " | ".join(METRIC_TITLES[m] for m in DEMO_METRICS) + " |",
             "|---|---:|" + "---:|" * len(DEMO_METRICS)]
    for method, by_shots in means.items():
        for shots, values in by_shots.items():
            cells = " | ".join(_percent(values[m]) for m in DEMO_METRICS)
            lines.append(f"| {method} | {shots} | {cells} |")
    return "\n".join(lines)


def run_demo(data: Path, out: Path, preset: str, params_for: Callable[[str, str], dict[str, Any]],
             eval_size: int | None, batch_size: int, overwrite: bool, progress: bool,
             max_pixels: int = MAX_PIXELS) -> tuple[str, Path]:
    """Evaluate every demo method at 0 and 1 shot; (summary table, report path).

    params_for(method, preset) gives each method's constructor arguments.
    """
    ensure_synthetic(data, progress=progress)
    means = {}
    with output_folder(out, "demo", (*DEMO_METHODS, "report.html"), overwrite, protected=[data]):
        for method in DEMO_METHODS:
            results = run_evaluation(method, params_for(method, preset), "mvtec", data, None, [0, 1], [0],
                                     out / method, eval_size, batch_size, overwrite, progress, max_pixels)
            means[method] = results["mean"]
        report = write_report({m: out / m for m in DEMO_METHODS}, out / "report.html",
                              title=f"clipfusion demo (preset {preset})")
    return summary_table(means), report
