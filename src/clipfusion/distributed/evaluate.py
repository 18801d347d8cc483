"""``evaluate --engine ray``: each pending (category, shots, seed) unit is a Ray task with the CPUs and
GPUs of one worker.  The worker writes the unit to ``--out/units/`` itself, as the local runner does,
so resuming, the folder lock (held by the driver) and ``results.json`` are unchanged.
``sweep --engine ray``: each (encoder setting, unit) is a task."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from clipfusion.config import RuntimeConfig
from clipfusion.data import AnomalyDataset
from clipfusion.distributed.recipe import DetectorRecipe
from clipfusion.distributed.tasks import run_tasks
from clipfusion.evaluation.runner import EvaluationRunner
from clipfusion.evaluation.sweep_units import SweepConfig, SweepTask, sweep_task
from clipfusion.evaluation.units import SkippedFile
from clipfusion.ray_cluster import RayOptions, connect


def _run_unit(runner: EvaluationRunner, category: str, shots: int, seed: int) -> dict[str, Any]:
    return runner.run_unit(category, shots, seed)


class RayUnits:
    """A unit engine for :meth:`EvaluationRunner.run`: at most ``workers`` units at once, each built
    from ``recipe`` on its worker (so ``auto`` device and dtype are the worker's)."""

    def __init__(self, options: RayOptions, recipe: DetectorRecipe) -> None:
        self.options, self.recipe = options, recipe
        self.ray = connect(options)

    def __call__(self, runner: EvaluationRunner, units: list[tuple[str, int, int]]) -> Iterator[dict[str, Any]]:
        shipped = copy.copy(runner)
        shipped.detector_factory, shipped.progress = self.recipe.build, False
        return run_tasks(self.ray, self.options, _run_unit, (shipped,), units)


def _sweep_task(config: SweepConfig, dataset: AnomalyDataset, runtime: RuntimeConfig,
                task: SweepTask) -> tuple[list[dict[str, Any]], list[SkippedFile]]:
    return sweep_task(config, dataset, runtime, task)  # ``auto`` resolved by the detector: the worker's


class RaySweep:
    """A sweep engine for :func:`run_sweep`: each (encoder setting, unit) a Ray task; its fusion settings
    reuse that task's encoder outputs, on the worker (they are never recomputed, nor shipped)."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.ray = connect(options)

    def __call__(self, config: SweepConfig, dataset: AnomalyDataset, runtime: RuntimeConfig, tasks: list[SweepTask]
                 ) -> Iterator[tuple[list[dict[str, Any]], list[SkippedFile]]]:
        return run_tasks(self.ray, self.options, _sweep_task, (config, dataset, runtime),
                         [(task,) for task in tasks])
