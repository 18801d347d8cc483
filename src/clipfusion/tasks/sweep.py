"""Grid search over CLIPFusion settings on a dataset: the tool to calibrate the reconstructed settings.

Encoder-level settings (timestep, layers, dense mode, prompts...) need new model passes: each of
their combinations encodes every test image once.  Fusion-level settings (``fusion__*``: α, σ,
score rule, which maps) reuse those encodings, so they cost no model pass.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.data import AnomalyDataset, Sample
from clipfusion.data.base import MAX_PIXELS
from clipfusion.errors import ClipfusionError
from clipfusion.evaluation import units
from clipfusion.evaluation.tables import METRIC_TITLES, METRICS
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.outputs import json_text, write_atomic
from clipfusion.run_folders import check_output_folder, output_folder

logger = logging.getLogger(__name__)
SWEEP_OUTPUTS = ("sweep.json", "sweep.md")


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``group__field=v1,v2`` or ``group__field=[json, values]`` → {key: [values]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text:
            raise ClipfusionError(f"--grid needs GROUP__FIELD=V1,V2,..., not {item!r}")
        try:
            values = json.loads(text) if text.lstrip().startswith("[") else None
        except json.JSONDecodeError as exc:
            raise ClipfusionError(f"--grid {key}: {exc}") from None
        if values is None:
            values = []
            for part in text.split(","):
                try:
                    values.append(json.loads(part))
                except json.JSONDecodeError:
                    values.append(part)
        grid[key.strip()] = values if isinstance(values, list) else [values]
    return grid


def _combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
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
    for fusion_setting in _combinations(fusion_grid):
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


def run_sweep(config: SweepConfig, dataset: AnomalyDataset, runtime: RuntimeConfig, out: str | Path,
              progress: bool = True, engine: SweepEngine | None = None) -> dict[str, Any]:
    """Score every combination of ``config.grid``; write sweep.json and sweep.md to ``out``.  ``engine``
    runs the model passes elsewhere (Ray); the local one runs them here, one after the other."""
    if config.metric not in METRICS:
        raise ClipfusionError(f"--metric must be one of {', '.join(METRICS)}, not {config.metric!r}")
    select, report = config.split()
    check_output_folder(Path(out), "sweep", SWEEP_OUTPUTS, protected=[dataset.root])  # before any model runs
    if any(seed < 0 for seed in config.seeds) or any(k < 0 for k in config.shots):
        raise ClipfusionError("--seeds and --shots must be >= 0")
    config = dataclasses.replace(config, shots=list(dict.fromkeys(config.shots)),
                                 seeds=list(dict.fromkeys(config.seeds)))
    if select == report:
        logger.warning("the best setting is selected and reported on the same test images (%s): its figures are "
                       "optimistic; pass --select-on CATEGORIES to choose on some categories and report on the "
                       "others", ", ".join(select))
    encoder_grid = {k: v for k, v in config.grid.items() if not k.startswith("fusion__")}
    for setting in _combinations(config.grid):  # refuse a bad setting before any model runs
        get_preset(config.preset, **config.overrides, **setting)
    tasks = [(encoder_setting, unit) for encoder_setting in _combinations(encoder_grid)
             for unit in units.unit_keys(config.categories, config.shots, config.seeds)]
    outcomes: list[tuple[list[dict[str, Any]], list[units.SkippedFile]]] = []
    bar = tqdm(total=len(tasks), desc="sweep (model passes)", disable=not progress)
    for outcome in (engine or sweep_here)(config, dataset, runtime, tasks):
        outcomes.append(outcome)
        bar.update(1)
    bar.close()
    rows = [row for task_rows, _ in outcomes for row in task_rows]
    skipped = list({(s.path, s.reason): s for _, task_skipped in outcomes for s in task_skipped}.values())
    summary = _summarise([r for r in rows if r["category"] in select], config.metric)
    best = summary[0] if summary else None
    held_out = None
    if best is not None and select != report:
        chosen = [r for r in rows if r["category"] in report and r["setting"] == best["setting"]]
        held_out = {"categories": report, **_summarise(chosen, config.metric)[0]}
    result = {"config": {**dataclasses.asdict(config), "eval_size": config.eval_size or "native"},
              "selected_on": select, "rows": rows, "summary": summary, "best": best, "held_out": held_out,
              "skipped": [dataclasses.asdict(s) for s in skipped]}
    with output_folder(Path(out), "sweep", SWEEP_OUTPUTS, overwrite=True, protected=[dataset.root]) as folder:
        write_atomic(folder / "sweep.json", json_text(result))
        write_atomic(folder / "sweep.md", render_sweep(result))
    return result


def _summarise(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per setting: every metric averaged over categories, shots and seeds; best ``metric`` first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row["setting"], sort_keys=True), []).append(row)
    summary = []
    for key, members in groups.items():
        entry = {"setting": json.loads(key)}
        for name in METRICS:
            values = [m[name] for m in members if m[name] is not None and math.isfinite(m[name])]
            entry[name] = float(np.mean(values)) if values else float("nan")
        summary.append(entry)
    return sorted(summary, key=lambda e: -e[metric] if math.isfinite(e[metric]) else math.inf)


def _percent(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def render_sweep(result: dict[str, Any]) -> str:
    config = result["config"]
    keys = list(config["grid"])
    lines = [f"# Sweep on preset {config['preset']}: {', '.join(keys)}", "",
             f"Mean over categories {result['selected_on']}, shots {config['shots']}, seeds {config['seeds']}; "
             f"percent; sorted by {METRIC_TITLES[config['metric']]}.", "",
             "| " + " | ".join(keys + [METRIC_TITLES[m] for m in METRICS]) + " |",
             "|" + "---|" * len(keys) + "---:|" * len(METRICS)]
    for entry in result["summary"]:
        cells = [json.dumps(entry["setting"][k]) for k in keys]
        cells += [_percent(entry[m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if result["best"]:
        lines += ["", f"Best by {METRIC_TITLES[config['metric']]}: " + ", ".join(
            f"`{k}={json.dumps(v)}`" for k, v in result["best"]["setting"].items())]
    held_out = result["held_out"]
    if held_out:
        lines += ["", f"The best setting on the held-out categories {held_out['categories']} (not used to choose it): "
                  + ", ".join(f"{METRIC_TITLES[m]} {_percent(held_out[m])}" for m in METRICS)]
    elif result["best"]:
        lines += ["", "**Chosen and measured on the same test images: optimistic.** Use `--select-on` to report "
                      "on categories the choice did not see."]
    return "\n".join(lines) + "\n"
