"""A self-contained HTML report of one or several evaluation folders (images embedded as data URIs)."""
from __future__ import annotations

import base64
import csv
import html
import math
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from clipfusion import __version__
from clipfusion.data.synthetic import MANIFEST as SYNTHETIC_MANIFEST
from clipfusion.evaluation.metrics import f1max_threshold
from clipfusion.evaluation.plots import metric_vs_shots, roc_curves, score_histogram
from clipfusion.evaluation.tables import METRIC_TITLES, METRICS
from clipfusion.outputs import read_json, write_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-top: 20px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; background: #f3f3f3; }
.banner { background: #fff3cd; border: 1px solid #e0b000; padding: 10px 14px; margin: 12px 0; }
.row { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; font-size: 11px; text-align: center; }
figure img { display: block; max-width: 180px; max-height: 180px; width: auto; height: auto; }
.plots img { width: 360px; height: auto; }
h4 { font-size: 13px; margin: 14px 0 4px; }
.meta { color: #555; font-size: 13px; }
"""


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _percent(value: float | None, std: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None and math.isfinite(std) else "")


def _table(header: list[str], rows: list[list[str]], mean_row: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    if mean_row:
        body += '<tr class="mean">' + "".join(f"<td>{html.escape(c)}</td>" for c in mean_row) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _load(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    results = read_json(folder / "results.json", "the results")
    # surrogateescape: paths that are not UTF-8 were written as their original bytes
    with (folder / "per_image.csv").open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
        per_image = [{**r, "label": int(r["label"]), "score": float(r["score"]), "shots": int(r["shots"]),
                      "seed": int(r["seed"])} for r in csv.DictReader(handle)]
    units = [read_json(p, "the finished unit") for p in sorted((folder / "units").rglob("*.json"))]
    return results, per_image, units


def dataset_name(config: dict[str, Any]) -> str:
    """The dataset's real name: the synthetic data is read through the MVTec loader but is not MVTec-AD."""
    if (Path(config["root"]) / SYNTHETIC_MANIFEST).is_file():
        return "synthetic (MVTec layout)"
    return str(config["dataset"])


def _method_section(label: str, folder: Path) -> tuple[str, dict[str, dict[str, float]], bool]:
    """(HTML, mean metrics per shots, whether it ran the tiny preset)."""
    results, per_image, units = _load(folder)
    config = results["config"]
    params = config.get("method_params", {})
    runtime = params.get("runtime", {})
    parts = [f"<h2>{html.escape(label)}</h2>",
             f'<p class="meta">dataset {html.escape(dataset_name(config))} at {html.escape(config["root"])}; '
             f'preset {html.escape(str(params.get("preset", "–")))}; '
             f'device {html.escape(str(runtime.get("device", "–")))}, '
             f'dtype {html.escape(str(runtime.get("dtype", "–")))}; evaluation size {config["eval_size"]}; '
             f'seeds {config["seeds"]}; AUPRO to FPR {config["fpr_limit"]}</p>']

    header = ["category", *(METRIC_TITLES[m] for m in METRICS)]
    for shots, mean in results["mean"].items():
        table = [[r["category"], *(_percent(r[f"{m}_mean"], r[f"{m}_std"] if r["n_seeds"] > 1 else None)
                                   for m in METRICS)]
                 for r in results["summary"] if str(r["shots"]) == shots]
        parts.append(f"<h3>{shots}-shot (percent; mean ± std over seeds)</h3>")
        parts.append(_table(header, table, ["mean", *(_percent(mean[m]) for m in METRICS)]))

    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in per_image:
        groups[(row["category"], row["shots"], row["seed"])].append(row)
    parts += _thresholds_section(groups)
    parts += _plots_section(per_image, units, groups, results["mean"])
    parts += _gallery_section(folder, units)
    return "\n".join(parts), results["mean"], params.get("preset") == "tiny"


def _thresholds_section(groups: dict[tuple[str, int, int], list[dict[str, Any]]]) -> list[str]:
    """The image-level F1-max threshold of each unit (an upper bound, chosen on the test labels)."""
    threshold_rows = []
    for (category, shots, seed), rows in groups.items():
        labels = np.array([r["label"] for r in rows])
        f1, threshold = f1max_threshold(labels, np.array([r["score"] for r in rows])) \
            if 0 < labels.sum() < len(labels) else (float("nan"), float("nan"))
        threshold_rows.append([category, str(shots), str(seed), _percent(f1),
                               "–" if not math.isfinite(threshold) else f"{threshold:.4f}"])
    return ["<h3>Image-level F1-max thresholds</h3><p class=\"meta\">Chosen on the test labels: an upper "
            "bound for comparison, not a deployable threshold (use <code>predict --threshold auto</code>).</p>",
            _table(["category", "shots", "seed", "F1-max", "threshold"], threshold_rows)]


def _plots_section(per_image: list[dict[str, Any]], units: list[dict[str, Any]],
                   groups: dict[tuple[str, int, int], list[dict[str, Any]]],
                   means: dict[str, dict[str, float]]) -> list[str]:
    """Per category: score histograms and ROC curves of each shot count's first seed; metrics vs shots."""
    parts = ["<h3>Scores and ROC curves</h3>"]
    for category in dict.fromkeys(r["category"] for r in per_image):
        parts.append(f'<h4>{html.escape(category)}</h4><div class="row plots">')  # one row per category
        curves = {}
        for (cat, shots, seed), rows in groups.items():
            if cat != category or seed != min(s for c, k, s in groups if c == cat and k == shots):
                continue
            labels = np.array([r["label"] for r in rows])
            scores = np.array([r["score"] for r in rows])
            normal, anomalous = scores[labels == 0], scores[labels == 1]
            png = score_histogram(normal, anomalous, f"{category}, {shots}-shot (seed {seed})")
            parts.append(f'<img src="{_data_uri(png)}" alt="score histogram {html.escape(category)}">')
            if 0 < labels.sum() < len(labels):
                fpr, tpr, _ = roc_curve(labels, scores)
                run = next(u for u in units if (u["category"], u["shots"], u["seed"]) == (cat, shots, seed))
                curves[f"{shots}-shot"] = (fpr, tpr, run["image_auroc"])
        if curves:
            png = roc_curves(curves, f"{category}: image ROC")
            parts.append(f'<img src="{_data_uri(png)}" alt="ROC {html.escape(category)}">')
        parts.append("</div>")
    if len(means) > 1:
        series = {METRIC_TITLES[m]: {int(k): v[m] for k, v in means.items() if v[m] is not None}
                  for m in ("image_auroc", "pixel_auroc", "pixel_aupro")}
        parts.append('<h4>mean over categories</h4><div class="row plots">'
                     f'<img src="{_data_uri(metric_vs_shots(series, "mean over categories"))}" alt="metric vs shots">'
                     "</div>")
    return parts


def _gallery_section(folder: Path, units: list[dict[str, Any]]) -> list[str]:
    """The best and worst detections of each shot count's first seed."""
    parts = ["<h3>Gallery: best and worst detections (first seed; white outline = ground truth)</h3>"]
    for unit in units:
        if unit["seed"] != min(u["seed"] for u in units if u["shots"] == unit["shots"]) or not unit.get("gallery"):
            continue
        parts.append(f'<p class="meta">{html.escape(unit["category"])}, {unit["shots"]}-shot</p><div class="row">')
        for item in unit["gallery"]:
            jpeg = (folder / item["file"]).read_bytes()
            caption = f'{item["kind"]}: {item["defect"]}, score {item["score"]:.3f}'
            parts.append(f'<figure><img src="{_data_uri(jpeg, "image/jpeg")}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    return parts


def write_report(folders: dict[str, Path], target: Path, title: str = "clipfusion evaluation") -> Path:
    """Render the evaluation folders (label → folder) into one self-contained HTML file at ``target``."""
    sections, means, tiny = [], {}, []
    for label, folder in folders.items():
        section, means[label], ran_tiny = _method_section(label, Path(folder))
        sections.append(section)
        if ran_tiny:
            tiny.append(label)
    # first thing on the page: numbers of untrained models must never be read as the method's
    banner = "" if not tiny else (
        f'<div class="banner">{html.escape(", ".join(tiny))} ran the preset <b>tiny</b>: untrained random models. '
        "These numbers show that the pipeline runs; they say nothing about the method.</div>")
    header = (f'<p class="meta">clipfusion {__version__}; written '
              f'{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</p>')
    comparison = ""
    if len(folders) > 1:
        metrics = ["image_auroc", "image_ap", "pixel_auroc", "pixel_aupro"]
        rows = [[label, shots, *(_percent(values[m]) for m in metrics)]
                for label, by_shots in means.items() for shots, values in by_shots.items()]
        comparison = "<h2>Comparison (mean over categories, percent)</h2>" + _table(
            ["method", "shots", *(METRIC_TITLES[m] for m in metrics)], rows)
    document = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{STYLE}</style></head><body>{banner}<h1>{html.escape(title)}</h1>{header}{comparison}"
                + "\n".join(sections) + "</body></html>")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, document)
    return target
