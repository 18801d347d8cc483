"""``clipfusion doctor``: does this machine run a model file as it ran when its thresholds were set?

One table: Python, torch (and OpenVINO), the CPU and the precision that will run, the encoder weights
found (offline: doctor never downloads), the model file's integrity, and the fingerprint's verdict
(``inspection.fingerprint``): *same*, *within tolerance*, or *different — thresholds may not hold:
recalibrate* (exit status 1, so a deployment script can gate on it).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from clipfusion.config import RuntimeConfig
from clipfusion.errors import ClipfusionError, WeightsNotFoundError
from clipfusion.hardware import precision_summary
from clipfusion.inspection.fingerprint import (
    DIFFERENT,
    Comparison,
    NormalScore,
    compare,
    installed_versions,
    take_fingerprint,
)
from clipfusion.inspection.models import ModelFile
from clipfusion.inspection.thresholds import score_normals
from clipfusion.outputs import file_sha256
from clipfusion.protocol import Detector
from clipfusion.tasks.inputs import collect_images

logger = logging.getLogger(__name__)
RECALIBRATE = "thresholds may not hold: recalibrate with `clipfusion calibrate --model M --normal DIR --out M`"


@dataclass
class Checkup:
    """The table's rows (what, what was found) and the fingerprint's comparison (None: none was made)."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    comparison: Comparison | None = None
    failed: bool = False  # the model could not be checked (damaged, tampered): as bad as "different"

    @property
    def exit_status(self) -> int:
        return 1 if self.failed or (self.comparison is not None and self.comparison.verdict == DIFFERENT) else 0

    def table(self) -> str:
        width = max(len(what) for what, _ in self.rows)
        return "\n".join(f"{what.ljust(width)}  {found}" for what, found in self.rows)


def _machine_rows() -> list[tuple[str, str]]:
    versions = installed_versions()
    runtimes = ", ".join(f"{name} {versions[name]}" for name in ("torch", "openvino") if name in versions)
    return [("Python", versions["python"]), ("runtimes", runtimes or "neither torch nor OpenVINO"),
            ("machine", precision_summary())]


def _normal_scores(detector: Detector, model: ModelFile, normal: str, batch_size: int) -> list[NormalScore]:
    """The recorded held-out normals found in ``normal`` (by content), scored here."""
    recorded = {n.sha256 for n in model.fingerprint.normals} if model.fingerprint is not None else set()
    found = [path for path in collect_images([normal]) if file_sha256(path) in recorded]
    if not found:
        raise ClipfusionError(f"--normal {normal} holds none of the {len(recorded)} held-out normal images the model "
                              "file's thresholds were set on (matched by content); give that folder, or leave "
                              "--normal out to compare the probe images only")
    scored = score_normals(detector, found, model.category, batch_size)
    return scored.fingerprint_entries()


def checkup(model_path: str, runtime: RuntimeConfig, normal: str | None = None, batch_size: int = 8) -> Checkup:
    """Every check of ``clipfusion doctor`` on the model file or export at ``model_path``."""
    result = Checkup(_machine_rows())
    if not Path(model_path).exists():
        raise ClipfusionError(f"--model {model_path} not found; give a model file (.cfm) from `clipfusion fit` or a "
                              "folder from `clipfusion export`")
    try:
        model = ModelFile.open(model_path)
    except ClipfusionError as exc:
        result.rows.append(("model file", f"FAILED: {exc}"))
        result.failed = True
        return result
    integrity = "every file matches its checksum" if model.is_export else "contents match their digest"
    result.rows.append(("export" if model.is_export else "model file",
                        f"{model.short_id}: {integrity}; {model.category}, preset {model.preset}, thresholds set in "
                        f"{model.recorded_dtype}"))
    if model.fingerprint is None:
        result.rows.append(("fingerprint", "none (written before fingerprints): `clipfusion calibrate` writes a "
                                           "model file with one (export it again)"))
        return result
    try:
        detector = model.detector(dataclasses.replace(runtime, offline=True), batch_size)  # what is on this machine
    except WeightsNotFoundError as exc:
        result.rows.append(("encoder weights", f"NOT FOUND: {exc}"))
        result.failed = True
        return result
    except ClipfusionError as exc:  # the bank refuses these settings (a changed default of a bank setting)
        result.rows.append(("model loads", f"FAILED: {exc}"))
        result.failed = True
        return result
    try:
        normals = _normal_scores(detector, model, normal, batch_size) if normal is not None else []
        here = take_fingerprint(detector, model.category, normals)
    except WeightsNotFoundError as exc:
        result.rows.append(("encoder weights", f"NOT FOUND: {exc}"))
        result.failed = True
        return result
    comparison = compare(model.fingerprint, here, scores_only=model.is_export)
    result.rows.append(("precision", f"{here.dtype} on {here.device} (the file: {model.fingerprint.dtype} on "
                                     f"{model.fingerprint.device})"))
    result.rows.append(("encoder weights", ", ".join(f"{name} {digest[:12]}" for name, digest in here.weights.items())
                        or "in the export's graphs (their checksums checked)"))
    result.rows.append(("compared", f"{len(here.probe_scores)} probe images"
                        + (f", {len(normals)} of {len(model.fingerprint.normals)} held-out normal images"
                           if normal is not None else " (--normal DIR: the held-out normal images too)")))
    for finding in comparison.causes:
        result.rows.append((finding.what, f"{finding.recorded} -> {finding.here}"))
    verdict = comparison.verdict + (f" — {RECALIBRATE}" if comparison.verdict == DIFFERENT else "")
    result.rows.append(("verdict", f"{verdict} (largest score difference {comparison.largest:.2e}; tolerance "
                                   f"{comparison.tolerance:g})"))
    result.comparison = comparison
    return result
