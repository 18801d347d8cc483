"""Grid search over CLIPFusion settings on a dataset: the tool to calibrate the reconstructed settings.

Encoder-level settings (timestep, layers, dense mode, prompts...) need new model passes: each of
their combinations encodes every test image once.  Fusion-level settings (``fusion__*``: α, σ,
score rule, which maps) reuse those encodings, so they cost no model pass.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.data import AnomalyDataset
from clipfusion.errors import ClipfusionError
from clipfusion.evaluation import units
from clipfusion.evaluation.sweep_units import SweepConfig, SweepEngine, combinations, sweep_here
from clipfusion.evaluation.tables import METRIC_TITLES, METRICS
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
    for setting in combinations(config.grid):  # refuse a bad setting before any model runs
        get_preset(config.preset, **config.overrides, **setting)
    tasks = [(encoder_setting, unit) for encoder_setting in combinations(encoder_grid)
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
