"""``clipfusion evaluate``: one method on one dataset, resumable, with the HTML report."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipfusion.data import load_dataset
from clipfusion.data.base import MAX_PIXELS
from clipfusion.errors import ClipfusionError
from clipfusion.evaluation.report import write_report
from clipfusion.evaluation.runner import EVALUATE_OUTPUTS, EvaluationConfig, EvaluationRunner, UnitEngine
from clipfusion.methods.registry import make_detector_factory
from clipfusion.protocol import describe
from clipfusion.run_folders import output_folder

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


def distinct(values: Sequence[int], option: str) -> list[int]:
    """``values`` without repeats, in their order (a repeated seed would count its runs twice in the mean)."""
    kept = list(dict.fromkeys(values))
    if len(kept) < len(values):
        logger.warning("repeated %s ignored: each runs once (%s)", option, " ".join(map(str, kept)))
    return kept


def run_evaluation(method: str, params: dict[str, Any], dataset_kind: str, root: Path,
                   categories: Sequence[str] | None, shots: Sequence[int], seeds: Sequence[int], out: Path,
                   eval_size: int | None, batch_size: int, overwrite: bool = False, progress: bool = True,
                   max_pixels: int = MAX_PIXELS, engine: UnitEngine | None = None,
                   worker_runtime: tuple[str, str] | None = None) -> dict[str, Any]:
    """Evaluate ``method`` (constructed with ``params``) and write results and report.html to ``out``.

    ``out`` is locked for the run; a folder holding anything clipfusion did not write is refused, and
    ``overwrite`` deletes only an earlier evaluation's own files.  ``engine`` runs the units elsewhere
    (Ray); ``worker_runtime`` is then the device and dtype as asked, resolved on each worker, and
    recorded as such.
    """
    if any(k < 0 for k in shots):
        raise ClipfusionError("--shots must be >= 0")
    if any(seed < 0 for seed in seeds):
        raise ClipfusionError("--seeds must be >= 0")
    dataset = load_dataset(dataset_kind, root)
    config = EvaluationConfig(
        dataset=dataset_kind, root=str(root.resolve()), method=method,
        categories=dataset.check_categories(categories), shots=distinct(shots, "--shots"),
        seeds=distinct(seeds, "--seeds"), eval_size=eval_size, batch_size=batch_size, max_pixels=max_pixels,
    )
    factory = make_detector_factory(method, **params)
    config.method_params = describe(factory())
    if worker_runtime is not None and "runtime" in config.method_params:
        config.method_params["runtime"].update(device=worker_runtime[0], dtype=worker_runtime[1])
    with output_folder(out, "evaluation", EVALUATE_OUTPUTS, overwrite, protected=[root]):
        results = EvaluationRunner(config, dataset, factory, out, progress=progress).run(engine)
        write_report({method: out}, out / "report.html", title=f"{method} on {dataset_kind}")
    logger.info("wrote results.json, results.md, per_image.csv and report.html to %s", out)
    return results
