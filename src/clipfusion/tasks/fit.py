"""From a folder of normal images: the inspection model file (``*.cfm``), or a bare memory bank; and a model
file's thresholds derived again in this machine's precision (``calibrate``)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from clipfusion.config import RuntimeConfig
from clipfusion.data.base import MAX_PIXELS, read_images
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError
from clipfusion.inspection.fingerprint import PROBE_COUNT, take_fingerprint
from clipfusion.inspection.models import ModelFile
from clipfusion.inspection.thresholds import ScoredNormals, score_normals
from clipfusion.outputs import file_sha256, probe_writable
from clipfusion.tasks.inputs import draw_references, held_out_normals

if TYPE_CHECKING:  # the detector's packages load only once the options, --normal and --out are checked
    from clipfusion.methods.clipfusion.detector import CLIPFusion

logger = logging.getLogger(__name__)


def check_writable_file(path: Path) -> None:
    """A one-line error unless ``path`` can be written as a file (its folder exists or can be made, and a
    file can be created in it: probed, not guessed from permissions, which root bypasses)."""
    if path.is_dir():
        raise ClipfusionError(f"--out {path} is a folder; give a file name such as {path / 'bank.safetensors'}")
    probe_writable(path)


def fit_memory(make_detector: Callable[[], CLIPFusion], normal: str, category: str, shots: int, seed: int, out: str,
               max_pixels: int = MAX_PIXELS) -> tuple[Path, list[str]]:
    """Draw ``shots`` references from ``normal`` with ``seed``, fit the detector ``make_detector`` builds
    (after every check), save the bank; (path, reference names)."""
    if shots < 1:
        raise ClipfusionError("--shots must be >= 1 for a memory bank")
    if seed < 0:
        raise ClipfusionError(f"--seed must be >= 0, not {seed}")
    check_writable_file(Path(out))  # before any model runs: a bad path must not cost the fit
    references = draw_references(normal, shots, seed)
    paths, images, _ = read_images(references.used, max_pixels)
    if not images:
        raise ClipfusionError(f"none of the drawn references in {normal} could be read")
    names = [p.name for p in paths]
    detector = make_detector()
    detector.fit(images, category, reference_names=names)
    return detector.save_memory(out), names


def fit_model(make_detector: Callable[[], CLIPFusion], normal: str, category: str, shots: int, seed: int, out: str,
              max_pixels: int = MAX_PIXELS, progress: bool = False) -> tuple[Path, CLIPFusion]:
    """The inspection model file: ``shots`` references drawn with ``seed`` (none: a zero-shot model),
    thresholds from the other normal images of ``normal`` (never the references), written to ``out``.
    ``make_detector`` is called once every check has passed."""
    if shots < 0 or seed < 0:
        raise ClipfusionError("--shots and --seed must be >= 0")
    check_writable_file(Path(out))  # before any model runs
    drawn = draw_references(normal, shots, seed)
    used, images, _ = read_images(drawn.used, max_pixels)
    if shots and not images:
        raise ClipfusionError(f"none of the drawn references in {normal} could be read")
    detector = make_detector()
    if images:
        detector.fit(images, category, reference_names=[p.name for p in used], progress=progress)
    logger.info("calibrating on %d held-out normal images", len(drawn.held_out))
    normals = score_normals(detector, drawn.held_out, category, detector.batch_size, max_pixels, progress)
    detector.set_thresholds(normals.thresholds, category)
    references = [{"name": p.name, "sha256": file_sha256(p)} for p in used]
    return detector.save(out, references, _fingerprint(detector, category, normals)), detector


def _fingerprint(detector: CLIPFusion, category: str, normals: ScoredNormals) -> str:
    """What the model file records of what it scores here (``clipfusion doctor`` compares with it)."""
    logger.info("fingerprint: scoring %d probe images and hashing the encoders' weights", PROBE_COUNT)
    return take_fingerprint(detector, category, normals.fingerprint_entries()).to_json()


def calibrate_model(model: str, normal: str, out: str, runtime: RuntimeConfig, batch_size: int = 8,
                    max_pixels: int = MAX_PIXELS, progress: bool = False) -> tuple[Path, Thresholds, CLIPFusion]:
    """``clipfusion calibrate``: the model file ``model`` written to ``out`` with its thresholds derived
    again from the normal images of ``normal`` that are not its references (matched by content), in
    ``runtime``'s precision (``auto``: this machine's default, not the one the file records).  The
    settings and the bank are kept; (path, the thresholds before, the recalibrated detector)."""
    from clipfusion.methods.clipfusion.detector import CLIPFusion
    from clipfusion.methods.clipfusion.model_file import MODEL_SUFFIX

    opened = ModelFile.open(model)  # before anything else: a mistyped or damaged file costs nothing
    if opened.card is None or opened.is_export:
        raise ClipfusionError(f"--model {model} is an export; calibrate its .cfm model file and export that again")
    card = opened.card
    if Path(out).suffix != MODEL_SUFFIX:
        raise ClipfusionError(f"--out {out} must be a model file ({MODEL_SUFFIX}), e.g. {Path(out).stem}{MODEL_SUFFIX}")
    check_writable_file(Path(out))  # before any model runs
    held_out = held_out_normals(normal, {reference["sha256"] for reference in card.references})
    here, _ = runtime.resolved()  # this machine's precision: what `auto` means without a model file
    detector = CLIPFusion.load(model, here, batch_size, card=card)
    logger.info("calibrating on %d normal images in %s (the model's references left out)", len(held_out),
                here.dtype)
    normals = score_normals(detector, held_out, card.category, batch_size, max_pixels, progress)
    detector.set_thresholds(normals.thresholds, card.category)
    fingerprint = _fingerprint(detector, card.category, normals)
    return detector.save(out, card.references, fingerprint), card.thresholds, detector
