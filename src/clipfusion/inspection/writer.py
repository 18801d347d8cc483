"""What an inspection leaves on disk, the same for ``predict`` and the service: each image's overlay
(the image with its map on the model's fixed colour scale, region boxes, the verdict), its mask (NG
images), its raw map and a thumbnail, and the row that names them.

Rendering (:func:`render`, bytes only) is apart from writing (:meth:`ImageWriter.write`), so
that it can run in another process (a Ray task) and the files are written only where and when the
caller commits a row; :meth:`ImageWriter.remove` takes back the files of a row that was not committed.
"""
from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipfusion.decisions import NG, Region
from clipfusion.inspection.core import Inspection, InspectionSettings
from clipfusion.inspection.thresholds import Decisions
from clipfusion.outputs import write_atomic
from clipfusion.overlays import inspection_overlay, mask_png, png_bytes, thumbnail_jpeg
from clipfusion.resampling import resize_image, resize_maps

FILE_SUFFIXES = {"maps": ".npy", "overlays": ".png", "masks": ".png", "thumbnails": ".jpg"}
# Overlays are drawn at most this many pixels on their longest side: a 100-megapixel frame would
# otherwise need gigabytes for its heatmap.  Masks and regions are always at the image's full size.
OVERLAY_MAX_SIDE = 2048
# A row of predict's results (and, less the file names, of the service's inspections).
ROW_FIELDS = ("path", "score", "normalised_score", "decision", "threshold", "regions", "overlay", "mask", "map",
              "thumbnail", "seconds", "model_id", "signer", "precision", "timestamp")


@dataclass
class Rendered:
    """One inspected image ready to be written: its row without file names, its files' bytes by folder
    (``maps``, ``overlays``, ``thumbnails``, and ``masks`` for NG images; no map when a service scored it)
    and its seconds so far.
    ``names``: the files' names by folder when they are written already (by a worker: ``files`` is then
    empty); None while only their bytes exist."""

    source: str
    row: dict[str, Any]
    files: dict[str, bytes]
    seconds: float
    names: dict[str, str] | None = None


# What becomes of one inspection on its way to the results: rendered, or (source, why it has no verdict).
Outcome = Rendered | tuple[str, str]
# Which inspections keep their overlay, thumbnail and raw map (``watch --pictures``).
Pictures = Literal["all", "ng", "none"]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _overlay_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) shrunk (aspect kept) so that the longest side is at most OVERLAY_MAX_SIDE."""
    scale = min(1.0, OVERLAY_MAX_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _scaled(regions: Sequence[Region], factor: float) -> list[Region]:
    return [Region(round(r.x * factor), round(r.y * factor), max(1, round(r.width * factor)),
                   max(1, round(r.height * factor)), r.area, r.peak) for r in regions]


def verdict_fields(inspection: Inspection, model_id: str | None, signer: str | None = None) -> dict[str, Any]:
    """The row fields of a verdict (no file names, no time): what every front end reports alike.
    ``signer``: the id of the trusted key that signed the model (None: not checked)."""
    normalised = inspection.normalised_score
    return {"score": inspection.score, "normalised_score": None if normalised is None else round(normalised, 6),
            "decision": inspection.decision, "threshold": inspection.threshold,
            "regions": None if inspection.regions is None else [asdict(r) for r in inspection.regions],
            "model_id": model_id, "signer": signer, "precision": inspection.precision}


def render(inspection: Inspection, decisions: Decisions, model_id: str | None = None, signer: str | None = None,
           pictures: bool = True) -> Rendered:
    """The row fields and file bytes of a scored inspection (no file is written); ``decisions`` gives
    the overlay's colour scale and the pixel threshold drawn.  ``pictures=False``: the row (and an NG
    image's mask) alone, no overlay, thumbnail or raw map — what a video's OK frames keep by default
    (encoding a 1080p overlay costs more than the tiny preset's model pass)."""
    assert inspection.ok and inspection.image is not None and inspection.anomaly_map is not None
    assert inspection.raw_map is not None and inspection.score is not None
    start, image = time.perf_counter(), inspection.image
    files = {}
    if inspection.decision == NG and inspection.mask is not None:
        files["masks"] = mask_png(inspection.mask)
    if not pictures:
        return Rendered(inspection.source, verdict_fields(inspection, model_id, signer), files,
                        inspection.seconds + time.perf_counter() - start)
    files["maps"] = _npy_bytes(inspection.raw_map)
    normalised = inspection.normalised_score
    title = f"{inspection.decision}  score {inspection.score:.4f}" \
        + ("" if normalised is None else f"  normalised {normalised:.2f}") \
        + ("" if inspection.threshold is None else f"  threshold {inspection.threshold:.4f}")
    height, width = _overlay_size(*image.shape[:2])
    picture = inspection_overlay(resize_image(image, (height, width)),
                                 resize_maps(inspection.anomaly_map[None], (height, width))[0], decisions.scale,
                                 title, str(inspection.decision),
                                 _scaled(inspection.regions or [], width / image.shape[1]), decisions.pixel)
    files["overlays"] = png_bytes(picture)
    files["thumbnails"] = thumbnail_jpeg(picture, side=256)
    return Rendered(inspection.source, verdict_fields(inspection, model_id, signer), files,
                    inspection.seconds + time.perf_counter() - start)


def render_all(inspections: Sequence[Inspection], settings: InspectionSettings, pictures: Pictures = "all"
               ) -> list[Outcome]:
    """Each inspection rendered (:func:`render`), or (source, error) for one without a verdict; ``pictures``:
    which inspections get their overlay, thumbnail and raw map (``all``, ``ng`` or ``none``)."""
    return [(item.source, str(item.error)) if not item.ok else
            render(item, settings.decisions, settings.model_id, settings.signer,
                   keeps_pictures(pictures, item.decision)) for item in inspections]


def keeps_pictures(pictures: Pictures, decision: str | None) -> bool:
    """Whether an inspection decided ``decision`` keeps its overlay, thumbnail and raw map under ``pictures``."""
    return pictures == "all" or (pictures == "ng" and decision == NG)


class ImageWriter:
    """Writes rendered inspections' files under ``out`` (``maps/``, ``overlays/``, ``masks/``,
    ``thumbnails/``) and gives their rows."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def store(self, name: str, rendered: Rendered) -> Rendered:
        """Write ``rendered``'s files as ``<folder>/<name><suffix>`` now; the same, holding their names
        instead of their bytes (what a worker hands the driver, which then writes only the row)."""
        names = {folder: f"{folder}/{name}{FILE_SUFFIXES[folder]}" for folder in rendered.files}
        for folder, data in rendered.files.items():
            (self.out / folder).mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / names[folder], data)
        return dataclasses.replace(rendered, files={}, names=names)

    def write(self, name: str, rendered: Rendered) -> dict[str, Any]:
        """Write ``rendered``'s files as ``<folder>/<name><suffix>`` (unless a worker wrote them already);
        its row (``path`` and the verdict), naming them relative to ``out``."""
        names = rendered.names if rendered.names is not None else self.store(name, rendered).names
        assert names is not None
        return {"path": rendered.source, **rendered.row, "overlay": names.get("overlays"), "mask": names.get("masks"),
                "map": names.get("maps"), "thumbnail": names.get("thumbnails")}

    def remove(self, row: dict[str, Any]) -> None:
        """Delete the files a row names (its row was not committed)."""
        for key in ("overlay", "mask", "map", "thumbnail"):
            if row.get(key):
                (self.out / row[key]).unlink(missing_ok=True)
