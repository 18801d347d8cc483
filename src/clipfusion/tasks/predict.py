"""Scoring users' own images, line-ready: each image's row (score, OK/NG, regions, file paths,
seconds) is streamed to results.jsonl/csv as soon as it is scored, with its overlay, mask, raw map
and thumbnail; an interrupted run resumes without scoring an image twice; index.html at the end."""
from __future__ import annotations

import functools
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clipfusion.data.base import MAX_PIXELS, read_images, read_rgb
from clipfusion.decisions import NG, Region, find_regions, label
from clipfusion.errors import ClipfusionError, ImageReadError
from clipfusion.export.bundle import model_sha256
from clipfusion.methods.clipfusion.model_file import read_card
from clipfusion.object_store import is_uri, read_uri_rgb
from clipfusion.outputs import json_text, read_json, write_atomic
from clipfusion.overlays import inspection_overlay, mask_png, png_bytes, thumbnail_jpeg
from clipfusion.protocol import Detector
from clipfusion.resampling import resize_image, resize_maps
from clipfusion.row_log import CSV, JSONL, PARTS, ParquetParts, RowLog
from clipfusion.run_folders import check_output_folder, output_folder
from clipfusion.tasks.index_page import write_index
from clipfusion.tasks.inputs import References, collect_sources, draw_references
from clipfusion.tasks.thresholds import Decisions, check_decision_options, resolve_decisions

logger = logging.getLogger(__name__)
# What predict writes directly in --out (all that --overwrite may delete).
PREDICT_OUTPUTS = ("run.json", JSONL, CSV, "summary.json", "index.html", "maps", "overlays", "masks", "thumbnails",
                   PARTS)
ROW_FIELDS = ("path", "score", "normalised_score", "decision", "threshold", "regions", "overlay", "mask", "map",
              "thumbnail", "seconds", "model_id", "precision", "timestamp")
NUMBER_FIELDS = ("score", "normalised_score", "threshold", "seconds")
NO_THRESHOLD = "no threshold"
# Overlays are drawn at most this many pixels on their longest side: a 100-megapixel frame would
# otherwise need gigabytes for its heatmap.  Masks and regions are always at the image's full size.
OVERLAY_MAX_SIDE = 2048
# What must be equal for --resume to continue a run: the same decisions on the same model, in the same precision.
RUN_IDENTITY = ("model_id", "method", "preset", "category", "image_threshold", "pixel_threshold", "scale", "min_area",
                "precision")


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


@dataclass(frozen=True)
class RowSettings:
    """What every row of one run shares."""

    category: str
    decisions: Decisions
    model_id: str | None
    min_area: int
    max_pixels: int


@dataclass
class Decoded:
    """One input as read for scoring: its path (or URI) and pixels (None if unreadable: ``reason`` says why)."""

    path: str
    image: np.ndarray | None
    seconds: float
    reason: str = ""


@dataclass
class Rendered:
    """One scored image ready to be written: its row without file names, its files' bytes by folder
    (``maps``, ``overlays``, ``thumbnails``, and ``masks`` for NG images) and its seconds so far."""

    path: str
    row: dict[str, Any]
    files: dict[str, bytes]
    seconds: float


Skipped = tuple[str, str]  # (path, reason)
Outcome = Rendered | Skipped
# Scores batches of sources, yielding each batch's outcomes in the batches' order.
Scorer = Callable[[Sequence[Sequence[str]]], Iterator[list[Outcome]]]
FILE_SUFFIXES = {"maps": ".npy", "overlays": ".png", "masks": ".png", "thumbnails": ".jpg"}


def render(settings: RowSettings, image: np.ndarray, score: float, raw_map: np.ndarray, full_map: np.ndarray
           ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One image's decisions and files: (row fields, {folder: bytes}).  ``raw_map`` (h, w) is at the
    detector's size; ``full_map`` (H, W) at the image's own size."""
    decisions = settings.decisions
    decision = NO_THRESHOLD if decisions.image is None else label(score, decisions.image)
    regions: list[Region] | None = None
    files = {"maps": _npy_bytes(raw_map.astype(np.float32))}
    if decisions.pixel is not None:
        mask, regions = find_regions(full_map, decisions.pixel, settings.min_area)
        if decision == NG:
            files["masks"] = mask_png(mask)
    normalised = None if decisions.normal is None else float(decisions.normal.normalised(np.array([score]))[0])
    title = f"{decision}  score {score:.4f}" + ("" if normalised is None else f"  normalised {normalised:.2f}") \
        + ("" if decisions.image is None else f"  threshold {decisions.image:.4f}")
    height, width = _overlay_size(*image.shape[:2])
    factor = width / image.shape[1]
    picture = inspection_overlay(resize_image(image, (height, width)),
                                 resize_maps(full_map[None], (height, width))[0], decisions.scale, title,
                                 decision, _scaled(regions or [], factor), decisions.pixel)
    files["overlays"] = png_bytes(picture)
    files["thumbnails"] = thumbnail_jpeg(picture, side=256)
    row = {"score": score, "normalised_score": None if normalised is None else round(normalised, 6),
           "decision": decision, "threshold": decisions.image,
           "regions": None if regions is None else [asdict(r) for r in regions], "model_id": settings.model_id}
    return row, files


class ImageWriter:
    """Writes scored images' files (raw map, mask, overlay, thumbnail) into a folder and returns their rows."""

    def __init__(self, out: Path, settings: RowSettings) -> None:
        self.out, self.settings = out, settings
        for folder in FILE_SUFFIXES:
            (out / folder).mkdir(parents=True, exist_ok=True)

    def write(self, name: str, rendered: Rendered) -> dict[str, Any]:
        """Write ``rendered``'s files as ``<folder>/<name><suffix>``; its row, naming them."""
        names = {folder: f"{folder}/{name}{FILE_SUFFIXES[folder]}" for folder in rendered.files}
        for folder, data in rendered.files.items():
            write_atomic(self.out / names[folder], data)
        return {"path": rendered.path, **rendered.row, "overlay": names["overlays"], "mask": names.get("masks"),
                "map": names["maps"], "thumbnail": names["thumbnails"]}

    def row(self, name: str, path: Path, image: np.ndarray, score: float, raw_map: np.ndarray,
            full_map: np.ndarray) -> dict[str, Any]:
        """Render and write one image (see :func:`render`); its row."""
        row, files = render(self.settings, image, score, raw_map, full_map)
        return self.write(name, Rendered(_path_text(path), row, files, 0.0))


def _path_text(path: str | Path) -> str:
    """How rows name an image: its absolute path, so a resumed run recognises it from any folder; a URI as given."""
    text = os.fsdecode(path)
    return text if is_uri(text) else os.path.abspath(text)


def decode_batch(sources: Sequence[str], max_pixels: int) -> list[Decoded]:
    """Read each source (a local path or a URI), timing each one; an unreadable one is kept with its reason."""
    decoded = []
    for source in sources:
        start = time.perf_counter()
        try:
            image = read_uri_rgb(source, max_pixels) if is_uri(source) else read_rgb(source, max_pixels)
            decoded.append(Decoded(_path_text(source), image, time.perf_counter() - start))
        except ImageReadError as exc:
            decoded.append(Decoded(_path_text(source), None, time.perf_counter() - start, exc.reason))
    return decoded


@dataclass
class Scored:
    """One image after the model pass: its pixels, score, raw map (h, w), seconds so far (read + model)
    and the dtype the models ran in (None for a method without models)."""

    path: str
    image: np.ndarray
    score: float
    raw_map: np.ndarray
    seconds: float
    precision: str | None


def predict_batch(detector: Detector, decoded: Sequence[Decoded], category: str) -> list[Scored | Skipped]:
    """The readable images of ``decoded`` in one model pass; the unreadable ones, and any whose score or
    map is not finite (never decided), as (path, reason).  In order."""
    readable = [(item, item.image) for item in decoded if item.image is not None]
    scored: dict[int, Scored | Skipped] = {}
    if readable:
        start = time.perf_counter()
        prediction = detector.predict([image for _, image in readable], category)
        model_seconds = time.perf_counter() - start
        precision = getattr(detector, "precision", None)
        for (item, image), score, raw_map in zip(readable, prediction.scores, prediction.maps, strict=True):
            if math.isfinite(float(score)) and np.isfinite(raw_map).all():
                scored[id(item)] = Scored(item.path, image, float(score), raw_map, item.seconds + model_seconds,
                                          precision)
            else:
                scored[id(item)] = (item.path, "score or map not finite (NaN or infinity; check the settings)")
    return [scored.get(id(item), (item.path, item.reason)) for item in decoded]


def render_batch(scored: Sequence[Scored | Skipped], settings: RowSettings) -> list[Outcome]:
    """Each scored image's decisions and files (:func:`render`, with its map at the image's own size)."""
    outcomes: list[Outcome] = []
    for item in scored:
        if isinstance(item, tuple):
            outcomes.append(item)
            continue
        start = time.perf_counter()
        full_map = resize_maps(item.raw_map[None], item.image.shape[:2])[0]  # as Prediction.maps_at_input_size
        row, files = render(settings, item.image, item.score, item.raw_map, full_map)
        outcomes.append(Rendered(item.path, {**row, "precision": item.precision}, files,
                                 item.seconds + time.perf_counter() - start))
    return outcomes


def score_batch(detector: Detector, decoded: Sequence[Decoded], settings: RowSettings) -> list[Outcome]:
    """:func:`predict_batch` then :func:`render_batch`: the outcomes of one batch, in order.

    A row's ``seconds`` is that image's own latency: its decoding, the model pass of its batch (the
    image waits for all of it) and the rendering of its files, each measured, nothing divided (the
    writer adds the writing).
    """
    return render_batch(predict_batch(detector, decoded, settings.category), settings)


def local_scorer(detector: Detector, settings: RowSettings) -> Scorer:
    """Batches scored one after the other in this process."""
    def score(batches: Sequence[Sequence[str]]) -> Iterator[list[Outcome]]:
        for batch in batches:
            yield score_batch(detector, decode_batch(batch, settings.max_pixels), settings)
    return score


def predict_paths(scorer: Scorer, sources: Sequence[str], out: Path, settings: RowSettings, batch_size: int = 8,
                  progress: bool = True, parts: ParquetParts | None = None
                  ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Score the ``sources`` not yet in ``out``'s results, streaming one row per image; (all rows, skipped).

    The driver alone writes: files are named by the row's position, so a resumed run never reuses a
    name.  ``parts`` also keeps the rows as Parquet parts.
    """
    writer = ImageWriter(out, settings)
    skipped: list[tuple[str, str]] = []
    with RowLog(out, ROW_FIELDS) as log:
        done = {row["path"] for row in log.rows}
        todo = [source for source in sources if _path_text(source) not in done]
        if done:
            logger.info("resuming: %d of %d images are already scored, %d to go", len(sources) - len(todo),
                        len(sources), len(todo))
        batches = [todo[begin:begin + batch_size] for begin in range(0, len(todo), batch_size)]
        bar = tqdm(total=len(todo), desc="predict", disable=not progress)
        for batch, outcomes in zip(batches, scorer(batches), strict=True):
            for outcome in outcomes:
                if isinstance(outcome, tuple):
                    logger.warning("skipped %s: %s", *outcome)
                    skipped.append(outcome)
                elif outcome.path not in done:  # a batch retried by an engine is written once
                    start = time.perf_counter()
                    row = writer.write(f"{len(log.rows):06d}_{PurePath(outcome.path).stem}", outcome)
                    log.append({**row, "seconds": round(outcome.seconds + time.perf_counter() - start, 4),
                                "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds")})
                    done.add(outcome.path)
            if parts is not None:
                parts.sync(log.rows)
            bar.update(len(batch))
        bar.close()
        if parts is not None:
            parts.sync(log.rows, final=True)
        return list(log.rows), skipped


@dataclass
class PredictJob:
    """What ``clipfusion predict`` was asked: inputs, optional references, thresholds and outputs."""

    inputs: Sequence[str]
    category: str
    out: str
    method: str = "clipfusion"
    preset: str | None = None
    model: str | None = None
    normal: str | None = None
    shots: int = 0
    seed: int = 0
    memory: str | None = None
    threshold: str | None = None
    scale: str | None = None
    min_area: int = 16
    batch_size: int = 8
    progress: bool = True
    overwrite: bool = False
    resume: bool = False
    max_pixels: int = MAX_PIXELS


def _check_resumable(out: Path, identity: dict[str, Any]) -> None:
    """--resume continues only a run of the same model and decisions; a one-line error names what differs."""
    earlier = read_json(out / "run.json", "the earlier run's settings").get("identity", {})
    changed = [key for key in RUN_IDENTITY if earlier.get(key) != identity.get(key)]
    if changed:
        what = "; ".join(f"{key} was {earlier.get(key)!r}, now {identity.get(key)!r}" for key in changed)
        raise ClipfusionError(f"--resume: {out} holds a run with other settings ({what}); use the same options, "
                              "or --overwrite to start afresh")


def _paths(job: PredictJob, out: Path) -> list[str]:
    # an input folder may hold --out itself (``predict .``): its overlays are outputs, not inputs
    paths = [p for p in collect_sources(job.inputs)
             if is_uri(p) or out.resolve() not in Path(os.path.realpath(p)).parents]
    if not paths:
        raise ClipfusionError(f"no image files found in {', '.join(job.inputs)} outside --out {out}")
    return paths


def _check_options(job: PredictJob) -> None:
    if job.memory and job.normal and job.shots:
        raise ClipfusionError("give either --memory or --normal with --shots, not both")
    if job.shots < 0:
        raise ClipfusionError(f"--shots must be >= 0, not {job.shots}")
    if job.shots and not job.normal:
        raise ClipfusionError(f"--shots {job.shots} needs --normal DIR, the folder to draw the references from "
                              "(or use a memory bank from `clipfusion fit` with --memory)")
    if job.seed < 0:
        raise ClipfusionError(f"--seed must be >= 0, not {job.seed}")
    if job.min_area < 1:
        raise ClipfusionError(f"--min-region-area must be >= 1 pixel, not {job.min_area}")
    if job.resume and job.overwrite:
        raise ClipfusionError("--resume continues the run in --out and --overwrite replaces it: give one of them")


@dataclass(frozen=True)
class Engine:
    """Where the images are scored: ``make_scorer(settings)`` gives the scorer of one run; ``parquet``
    also keeps the rows as Parquet parts (``parts/``) for data tools; ``precision``: the dtype its
    detectors run in, as far as the driver can tell (each row says what ran)."""

    make_scorer: Callable[[RowSettings], Scorer]
    parquet: bool = False
    precision: str | None = None


@dataclass(frozen=True)
class PredictPlan:
    """What a predict run reads and where it writes, checked by :func:`plan_predict` before any model
    loads or engine starts, so a mistyped path costs seconds, not a model load.

    paths: the images (absolute paths or URIs); protected: the input folders (never written);
    earlier: whether ``out`` holds an earlier run; drawn: the references drawn from ``--normal``."""

    paths: list[str]
    out: Path
    protected: list[Path]
    earlier: bool
    drawn: References | None


def plan_predict(job: PredictJob, local: bool = True) -> PredictPlan:
    """Every one-line error of the options, the inputs, ``--normal`` and ``--out``; ``local``: the
    images are scored in this process (``--memory`` and ``--normal`` need it)."""
    _check_options(job)
    if not local and (job.memory or job.normal):
        raise ClipfusionError("--memory and --normal need the local engine: write a model file with "
                              "`clipfusion fit --out X.cfm` and pass --model X.cfm")
    check_decision_options(job.threshold, job.scale, job.normal)
    if job.memory and not Path(job.memory).is_file():
        raise ClipfusionError(f"--memory {job.memory} not found; write one with `clipfusion fit --out "
                              f"{job.memory}`")
    out = Path(job.out)
    paths = _paths(job, out)
    protected = [Path(item).expanduser() for item in job.inputs
                 if not is_uri(item) and Path(item).expanduser().is_dir()]
    check_output_folder(out, "predict", PREDICT_OUTPUTS, protected=protected)
    earlier = out.is_dir() and (out / "run.json").is_file()
    if earlier and not (job.overwrite or job.resume):
        raise ClipfusionError(f"--out {out} holds an earlier predict run; add --resume to score only the images "
                              "it lacks, --overwrite to replace it (only clipfusion's own files are deleted), or "
                              "choose another folder")
    drawn = draw_references(job.normal, job.shots, job.seed) if job.normal else None
    return PredictPlan(paths, out, protected, earlier, drawn)


def run_predict(job: PredictJob, plan: PredictPlan, detector: Detector | None, engine: Engine | None = None
                ) -> tuple[dict[str, Any], Decisions]:
    """Fit ``detector`` on the drawn references or load a memory bank, set the decisions, score the
    inputs of ``plan`` (from :func:`plan_predict`).

    ``engine`` None scores with ``detector`` in this process.  An engine that builds its own detectors
    (Ray) may come with ``detector`` None: the thresholds are then read from the model file's card.
    """
    if engine is None:
        if detector is None:
            raise ValueError("run_predict needs a detector or an engine")
        engine = Engine(functools.partial(local_scorer, detector), precision=getattr(detector, "precision", None))
    out, earlier = plan.out, plan.earlier
    if job.resume and not earlier:
        logger.info("--resume: %s holds no earlier run; starting one", out)
    references: list[str] = []
    held_out: list[Path] | None = None
    if job.memory and detector is not None:
        load_memory = getattr(detector, "load_memory", None)
        if load_memory is None:
            raise ClipfusionError(f"--memory works with --method clipfusion, not {job.method}")
        load_memory(job.memory)
        references = detector.memory_bank_.manifest.get("references", [])  # type: ignore[attr-defined]
    if plan.drawn is not None and detector is not None:
        # the memory bank's own references are not held out: they would pull an auto threshold down
        held_out = [p for p in plan.drawn.held_out if p.name not in set(references)]
        if plan.drawn.used:
            used, images, _ = read_images(plan.drawn.used, job.max_pixels)
            detector.fit(images, job.category)
            references = [p.name for p in used]
    thresholds = getattr(detector, "thresholds_", None) if detector is not None else \
        read_card(Path(job.model)).thresholds if job.model else None
    decisions = resolve_decisions(job.threshold, job.scale, thresholds, detector, job.category, held_out,
                                  job.batch_size, job.progress)
    model_id = model_sha256(Path(job.model)) if job.model else None
    identity = {"model_id": model_id, "method": job.method, "preset": job.preset, "category": job.category,
                "image_threshold": decisions.image, "pixel_threshold": decisions.pixel,
                "scale": list(decisions.scale), "min_area": job.min_area, "precision": engine.precision}
    settings = RowSettings(job.category, decisions, model_id, job.min_area, job.max_pixels)
    with output_folder(out, "predict", PREDICT_OUTPUTS, job.overwrite, protected=plan.protected):
        if job.resume and earlier:
            _check_resumable(out, identity)
        else:
            write_atomic(out / "run.json", json_text({"identity": identity, "how": decisions.how,
                                                      "references": references, "model": job.model}))
        parts = ParquetParts(out / PARTS, ROW_FIELDS, NUMBER_FIELDS) if engine.parquet else None
        rows, skipped = predict_paths(engine.make_scorer(settings), plan.paths, out, settings, job.batch_size,
                                      job.progress, parts)
        if not rows:
            raise ClipfusionError("none of the images could be scored (see the messages above)")
        summary = {"identity": identity, "how": decisions.how, "references": references, "model": job.model,
                   "images": len(rows), "NG": sum(r["decision"] == NG for r in rows),
                   "skipped": [{"path": p, "reason": r} for p, r in skipped]}
        write_atomic(out / "summary.json", json_text(summary))
        source = f"model {Path(job.model).name} ({model_id[:12]})" if job.model and model_id else \
            f"{job.method}, preset {job.preset}"
        write_index(out, rows, f"{job.category}: {source}", decisions.how,
                    f"colour scale {decisions.scale[0]:.4g} to {decisions.scale[1]:.4g}; regions of at least "
                    f"{job.min_area} pixels above the pixel threshold"
                    + ("" if decisions.pixel is None else f" {decisions.pixel:.4g}"), len(skipped))
    return summary, decisions
