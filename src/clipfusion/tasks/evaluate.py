"""``clipfusion evaluate``: one method on one dataset, resumable, with the HTML report."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipfusion.data import load_dataset
from clipfusion.errors import ClipfusionError
from clipfusion.evaluation.report import write_report
from clipfusion.evaluation.runner import EvaluationConfig, EvaluationRunner
from clipfusion.methods.registry import make_detector_factory

logger = logging.getLogger(__name__)


def parse_eval_size(text: str) -> int | None:
    """``native`` → None (each mask's own size), else a positive square side."""
    if text == "native":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ClipfusionError(f"--eval-size must be a positive integer or 'native', not {text!r}") from None
    if value <= 0:
        raise ClipfusionError(f"--eval-size must be positive, not {value}")
    return value


def run_evaluation(method: str, params: dict[str, Any], dataset_kind: str, root: Path,
                   categories: Sequence[str] | None, shots: list[int], seeds: list[int], out: Path,
                   eval_size: int | None, batch_size: int, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate ``method`` (constructed with ``params``) and write results and report.html to ``out``."""
    if any(k < 0 for k in shots):
        raise ClipfusionError("--shots must be >= 0")
    dataset = load_dataset(dataset_kind, root)
    config = EvaluationConfig(
        dataset=dataset_kind, root=str(root.resolve()), method=method,
        categories=dataset.check_categories(categories), shots=shots, seeds=seeds,
        eval_size=eval_size, batch_size=batch_size,
    )
    factory = make_detector_factory(method, **params)
    config.method_params = factory().get_params()
    if overwrite and out.exists():
        shutil.rmtree(out)
    results = EvaluationRunner(config, dataset, factory, out, progress=progress).run()
    write_report({method: out}, out / "report.html", title=f"{method} on {dataset_kind}")
    logger.info("wrote results.json, results.md, per_image.csv and report.html to %s", out)
    return results
