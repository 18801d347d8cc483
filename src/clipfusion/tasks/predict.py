"""Scoring users' own images, line-ready: each image's row (score, OK/NG, regions, file paths,
seconds) is streamed to results.jsonl/csv as soon as it is scored, with its overlay, mask, raw map
and thumbnail; an interrupted run resumes without scoring an image twice; index.html at the end."""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

from tqdm.auto import tqdm

from clipfusion.config import RuntimeConfig
from clipfusion.data.base import MAX_PIXELS, read_images
from clipfusion.decisions import NG
from clipfusion.errors import ClipfusionError
from clipfusion.inspection.core import InspectionSettings
from clipfusion.inspection.models import ModelFile
from clipfusion.inspection.sources import source_name
from clipfusion.inspection.thresholds import Decisions, check_decision_options, resolve_decisions
from clipfusion.inspection.writer import ROW_FIELDS, ImageWriter, Outcome, render_all
from clipfusion.object_store import is_uri
from clipfusion.outputs import json_text, read_json, write_atomic
from clipfusion.protocol import Detector
from clipfusion.row_log import CSV, JSONL, PARTS, ParquetParts, RowLog
from clipfusion.run_folders import check_output_folder, output_folder
from clipfusion.tasks.index_page import write_index
from clipfusion.tasks.inputs import References, collect_sources, draw_references

logger = logging.getLogger(__name__)
# What predict writes directly in --out (all that --overwrite may delete).
PREDICT_OUTPUTS = ("run.json", JSONL, CSV, "summary.json", "index.html", "maps", "overlays", "masks", "thumbnails",
                   PARTS)
NUMBER_FIELDS = ("score", "normalised_score", "threshold", "seconds")
# What must be equal for --resume to continue a run: the same decisions on the same model, in the same precision.
RUN_IDENTITY = ("model_id", "method", "preset", "category", "image_threshold", "pixel_threshold", "scale", "min_area",
                "precision")


# Scores batches of sources, yielding each batch's outcomes in the batches' order.
Scorer = Callable[[Sequence[Sequence[str]]], Iterator[list[Outcome]]]


def local_scorer(detector: Detector, settings: InspectionSettings, out: Path) -> Scorer:
    """Batches inspected one after the other in this process.

    A row's ``seconds`` is that image's own latency: its decoding, the model pass of its batch (the
    image waits for all of it), the decisions and the rendering of its files, each measured, nothing
    divided (the writer adds the writing)."""
    inspector = settings.inspector(detector)

    def score(batches: Sequence[Sequence[str]]) -> Iterator[list[Outcome]]:
        for batch in batches:
            yield render_all(inspector.inspect(batch), settings)
    return score


def predict_paths(scorer: Scorer, sources: Sequence[str], out: Path, batch_size: int = 8, progress: bool = True,
                  parts: ParquetParts | None = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Score the ``sources`` not yet in ``out``'s results, streaming one row per image; (all rows, skipped).

    The driver alone writes: files are named by the row's position, so a resumed run never reuses a
    name.  ``parts`` also keeps the rows as Parquet parts.
    """
    writer = ImageWriter(out)
    skipped: list[tuple[str, str]] = []
    with RowLog(out, ROW_FIELDS) as log:
        done = {row["path"] for row in log.rows}
        todo = [source for source in sources if source_name(source) not in done]
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
                elif outcome.source not in done:  # a batch retried by an engine is written once
                    start = time.perf_counter()
                    row = writer.write(f"{len(log.rows):06d}_{PurePath(outcome.source).stem}", outcome)
                    log.append({**row, "seconds": round(outcome.seconds + time.perf_counter() - start, 4),
                                "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds")})
                    done.add(outcome.source)
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
    """Where the images are scored: ``make_scorer(settings, out)`` gives the scorer of one run writing into
    ``out`` (an engine whose workers reach ``out`` may write the files there itself); ``parquet``
    also keeps the rows as Parquet parts (``parts/``) for data tools; ``precision``: the dtype its
    detectors run in, as far as the driver can tell (each row says what ran)."""

    make_scorer: Callable[[InspectionSettings, Path], Scorer]
    parquet: bool = False
    precision: str | None = None


def choose_engine(engine: str, method: str, params: Callable[[], dict[str, Any]], model: ModelFile | None,
                  runtime: RuntimeConfig, batch_size: int, ray_options: Any = None, shared_out: bool = False
                  ) -> tuple[Detector | None, Engine | None]:
    """``--engine``: (the detector of this process, None) for ``local``, built from the opened ``model`` or
    from ``method`` and its constructor arguments ``params()``; (None, the Ray engine) for ``ray``, whose
    workers build the same detector (``ray_options``: the cluster, workers and their resources)."""
    if engine == "ray":
        from clipfusion.distributed.predict import ray_scorer
        from clipfusion.distributed.recipe import DetectorRecipe

        recipe = DetectorRecipe(method, params()) if model is None else \
            DetectorRecipe("clipfusion", {"batch_size": batch_size, "runtime": runtime}, str(model.path),
                           model.recorded_dtype, model.sha256)
        return None, Engine(ray_scorer(recipe, ray_options, shared_out), parquet=True, precision=recipe.precision())
    if model is not None:
        return model.detector(runtime, batch_size), None
    from clipfusion.methods.registry import make_detector_factory

    return make_detector_factory(method, **params())(), None


@dataclass(frozen=True)
class PredictPlan:
    """What a predict run reads and where it writes, checked by :func:`plan_predict` before any model
    loads or engine starts, so a mistyped path costs seconds, not a model load.

    paths: the images (absolute paths or URIs); protected: the input folders (never written);
    earlier: whether ``out`` holds an earlier run; drawn: the references drawn from ``--normal``;
    clear: ``out`` holds a run that stopped before scoring any image, whose own files are replaced."""

    paths: list[str]
    out: Path
    protected: list[Path]
    earlier: bool
    drawn: References | None
    clear: bool = False


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


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
    clear = earlier and b"\n" not in _read_or_empty(out / JSONL)
    if clear:  # a crash or an error before the first row: nothing to resume, nothing of value to keep
        logger.info("--out %s holds a run that scored no image; starting afresh", out)
        earlier = False
    if earlier and not (job.overwrite or job.resume):
        raise ClipfusionError(f"--out {out} holds an earlier predict run; add --resume to score only the images "
                              "it lacks, --overwrite to replace it (only clipfusion's own files are deleted), or "
                              "choose another folder")
    drawn = draw_references(job.normal, job.shots, job.seed) if job.normal else None
    return PredictPlan(paths, out, protected, earlier, drawn, clear)


def _learn(job: PredictJob, plan: PredictPlan, detector: Detector | None) -> tuple[list[str], list[Path] | None]:
    """Load ``--memory`` or fit on the references drawn from ``--normal``; (reference names, the held-out
    normal images for ``--threshold auto``, None without ``--normal``)."""
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
    return references, held_out


def run_predict(job: PredictJob, plan: PredictPlan, detector: Detector | None, engine: Engine | None = None,
                model: ModelFile | None = None) -> tuple[dict[str, Any], Decisions]:
    """Fit ``detector`` on the drawn references or load a memory bank, set the decisions, score the
    inputs of ``plan`` (from :func:`plan_predict`) through the one inspection core.

    ``model``: the opened ``--model`` (its thresholds and identity).  ``engine`` None scores with
    ``detector`` in this process; an engine that builds its own detectors (Ray) comes with ``detector``
    None.
    """
    if engine is None:
        if detector is None:
            raise ValueError("run_predict needs a detector or an engine")
        engine = Engine(functools.partial(local_scorer, detector), precision=getattr(detector, "precision", None))
    if job.resume and not plan.earlier:
        logger.info("--resume: %s holds no earlier run; starting one", plan.out)
    references, held_out = _learn(job, plan, detector)
    thresholds = getattr(detector, "thresholds_", None) if detector is not None else \
        model.thresholds if model is not None else None
    decisions = resolve_decisions(job.threshold, job.scale, thresholds, detector, job.category, held_out,
                                  job.batch_size, job.progress, job.max_pixels)
    model_id = None if model is None else model.sha256
    identity = {"model_id": model_id, "method": job.method, "preset": job.preset, "category": job.category,
                "image_threshold": decisions.image, "pixel_threshold": decisions.pixel,
                "scale": list(decisions.scale), "min_area": job.min_area, "precision": engine.precision}
    settings = InspectionSettings(decisions, job.category, model_id, job.min_area, job.max_pixels,
                                  None if model is None else model.signer)
    with output_folder(plan.out, "predict", PREDICT_OUTPUTS, job.overwrite or plan.clear, protected=plan.protected):
        if job.resume and plan.earlier:
            _check_resumable(plan.out, identity)
        else:
            write_atomic(plan.out / "run.json", json_text({"identity": identity, "how": decisions.how,
                                                           "references": references, "model": job.model}))
        parts = ParquetParts(plan.out / PARTS, ROW_FIELDS, NUMBER_FIELDS) if engine.parquet else None
        rows, skipped = predict_paths(engine.make_scorer(settings, plan.out), plan.paths, plan.out, job.batch_size,
                                      job.progress, parts)
        if not rows:
            raise ClipfusionError("none of the images could be scored (see the messages above)")
        summary = {"identity": identity, "how": decisions.how, "references": references, "model": job.model,
                   "images": len(rows), "NG": sum(r["decision"] == NG for r in rows),
                   "skipped": [{"path": p, "reason": r} for p, r in skipped]}
        write_atomic(plan.out / "summary.json", json_text(summary))
        _write_index(job, plan.out, rows, decisions, model, len(skipped))
    return summary, decisions


def _write_index(job: PredictJob, out: Path, rows: list[dict[str, Any]], decisions: Decisions,
                 model: ModelFile | None, skipped: int) -> None:
    source = f"model {model.short_id}" if model is not None else f"{job.method}, preset {job.preset}"
    write_index(out, rows, f"{job.category}: {source}", decisions.how,
                f"colour scale {decisions.scale[0]:.4g} to {decisions.scale[1]:.4g}; regions of at least "
                f"{job.min_area} pixels above the pixel threshold"
                + ("" if decisions.pixel is None else f" {decisions.pixel:.4g}"), skipped)
