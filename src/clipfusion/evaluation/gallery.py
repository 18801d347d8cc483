"""The report's gallery: overlays of a unit's most and least convincing detections."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.data import read_rgb
from clipfusion.outputs import write_atomic
from clipfusion.overlays import overlay, thumbnail_jpeg
from clipfusion.resampling import resize_image


def write_gallery(out_dir: Path, unit: str, rows: list[dict[str, Any]], maps: list[np.ndarray],
                   masks: list[np.ndarray | None]) -> list[dict[str, Any]]:
    """Overlays of the unit's most and least convincing detections, for the report.

    best: the two highest-scored anomalous images; worst: the lowest-scored anomalous image and
    the highest-scored normal one.  One colour scale for all of them: the unit's map range.
    """
    anomalous = sorted((i for i, r in enumerate(rows) if r["label"] == 1), key=lambda i: -rows[i]["score"])
    normal = sorted((i for i, r in enumerate(rows) if r["label"] == 0), key=lambda i: -rows[i]["score"])
    picks = [("best", i) for i in anomalous[:2]]
    if len(anomalous) > 2:
        picks.append(("missed", anomalous[-1]))
    if normal:
        picks.append(("false alarm", normal[0]))
    low = float(min(m.min() for m in maps))
    high = float(max(m.max() for m in maps))
    folder = out_dir / "units" / f"{unit}_gallery"
    gallery = []
    for rank, (kind, i) in enumerate(picks):
        image = resize_image(read_rgb(rows[i]["path"]), maps[i].shape)
        picture = overlay(image, maps[i], low, high, masks[i])
        name = f"{rank}.jpg"
        write_atomic(folder / name, thumbnail_jpeg(picture))
        gallery.append({"file": f"units/{unit}_gallery/{name}", "kind": kind, **rows[i]})
    return gallery
