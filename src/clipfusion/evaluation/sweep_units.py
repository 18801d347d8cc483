"""What one sweep pass computes, apart from where it runs (this process or a Ray task): the settings of a
sweep (:class:`SweepConfig`), one task (an encoder-level setting on one (category, shots, seed) unit) and
its rows of metrics for every fusion-level setting on the same encoder outputs."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipfusion.config import RuntimeConfig
from clipfusion.data import AnomalyDataset, Sample
from clipfusion.data.base import MAX_PIXELS
from clipfusion.errors import ClipfusionError
from clipfusion.evaluation import units
from clipfusion.methods.clipfusion.detector import CLIPFusion


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values, as {key: value}, in the grid's order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


@dataclass
class SweepConfig:
    preset: str
    categories: list[str]
    shots: list[int]
    seeds: list[int]
    grid: dict[str, list[Any]]
    overrides: dict[str, Any]
    eval_size: int | None = 256
    metric: str = "pixel_aupro"
    batch_size: int = 8
    fpr_limit: float = 0.3
    select_on: list[str] | None = None
    max_pixels: int = MAX_PIXELS

    def split(self) -> tuple[list[str], list[str]]:
        """(categories the best setting is chosen on, categories it is reported on).

        Without ``select_on`` both are every category: the reported figure is then chosen on the
        very test labels it is measured with, hence optimistic (the caller warns).
        """
        if not self.select_on:
            return list(self.categories), list(self.categories)
        unknown = [c for c in self.select_on if c not in self.categories]
        if unknown:
            raise ClipfusionError(f"--select-on {unknown} not among the swept categories {self.categories}")
        report = [c for c in self.categories if c not in self.select_on]
        if not report:
            raise ClipfusionError("--select-on names every category: leave some out to report the chosen setting on")
        return list(self.select_on), report


# One encoder-level setting on one (category, shots, seed) unit: what a model pass is spent on.
SweepTask = tuple[dict[str, Any], tuple[str, int, int]]
# Runs sweep tasks, yielding each one's (rows, skipped files) in the tasks' order.
SweepEngine = Callable[["SweepConfig", AnomalyDataset, RuntimeConfig, list[SweepTask]],
                       Iterator[tuple[list[dict[str, Any]], list[units.SkippedFile]]]]


# A category's decoded test samples and the files among them that could not be read.
LoadedSamples = tuple[list[Sample], list[units.SkippedFile]]


def sweep_task(config: SweepConfig, dataset: AnomalyDataset, runtime: RuntimeConfig, task: SweepTask,
               loaded: dict[str, LoadedSamples] | None = None) -> tuple[list[dict[str, Any]], list[units.SkippedFile]]:
    """One model pass over a unit's test images with one encoder setting, then every fusion setting on
    its encoder outputs (no further model pass): (rows of metrics, files skipped).  ``loaded`` keeps
    each category's decoded test images for the next tasks of the same process."""
    encoder_setting, (category, shots, seed) = task
    fusion_grid = {k: v for k, v in config.grid.items() if k.startswith("fusion__")}
    loaded = {} if loaded is None else loaded
    if category not in loaded:
        unreadable: list[units.SkippedFile] = []
        loaded[category] = (units.load_samples(dataset.test_samples(category), unreadable, config.max_pixels),
                            unreadable)
    samples, unreadable = loaded[category]
    skipped = list(unreadable)
    detector = CLIPFusion(config.preset, runtime, config.batch_size, **config.overrides, **encoder_setting)
    names, references = units.load_references(dataset, category, shots, seed, skipped, config.max_pixels)
    if shots:
        detector.fit(references, category, reference_names=names)
    maps = detector.encode([s.image for s in samples], category)
    labels = np.array([s.label for s in samples])
    rows = []
    for fusion_setting in combinations(fusion_grid):
        fusion = dataclasses.replace(detector.config.fusion,
                                     **{k.removeprefix("fusion__"): v for k, v in fusion_setting.items()})
        prediction = detector.fuse(maps, fusion)
        pairs = [units.at_eval_size(s.mask, m, config.eval_size) for s, m in zip(samples, prediction.maps,
                                                                                 strict=True)]
        metrics = units.unit_metrics(labels, prediction.scores, [p[0] for p in pairs], [p[1] for p in pairs],
                                     config.fpr_limit)
        rows.append({"setting": {**encoder_setting, **fusion_setting}, "category": category,
                     "shots": shots, "seed": seed, **metrics})
    return rows, skipped


def sweep_here(config: SweepConfig, dataset: AnomalyDataset, runtime: RuntimeConfig, tasks: list[SweepTask]
               ) -> Iterator[tuple[list[dict[str, Any]], list[units.SkippedFile]]]:
    """The local engine: the tasks one after the other, in this process, each category's test images
    decoded once."""
    loaded: dict[str, LoadedSamples] = {}
    for task in tasks:
        yield sweep_task(config, dataset, runtime, task, loaded)
