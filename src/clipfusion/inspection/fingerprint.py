"""A model's known answer: what it scored, and under which conditions, when its thresholds were set.

``fit`` and ``calibrate`` store a :class:`Fingerprint` in the model file: the scores (and three statistics
of the map) of a few probe images generated from a fixed seed (recomputable anywhere, no files needed),
the scores of the held-out normal images that set the thresholds (by name and SHA-256, recomputed when
they are given again), the settings in full, the precision, the package versions, the CPU, and a digest
of each encoder's weights.  ``clipfusion doctor`` takes the same fingerprint here and :func:`compare`
says whether the thresholds still hold: *same*, *within tolerance* (a precision change within the measured
bfloat16/float32 difference), or *different* (recalibrate), naming what changed.
"""
from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
from PIL import Image

from clipfusion.errors import ClipfusionError
from clipfusion.hardware import BF16_SCORE_TOLERANCE, cpu_info
from clipfusion.protocol import Detector

FINGERPRINT_VERSION = 1
PROBE_SEED, PROBE_COUNT, PROBE_SIZE = 20261207, 3, 128
# Runs in one precision on one kind of machine agree to this: float32 exactly, bfloat16 within 6e-5 when the
# threads differ (benchmarks/results/precision.json).  Above it, a precision change may explain up to
# BF16_SCORE_TOLERANCE (the largest bfloat16/float32 difference measured, rounded up); nothing else does.
SAME_SCORE_TOLERANCE = 1e-4
PACKAGES = ("clipfusion", "torch", "diffusers", "transformers", "open_clip_torch", "numpy", "openvino")
SAME, WITHIN, DIFFERENT = "same", "within tolerance", "different"


@dataclass(frozen=True)
class NormalScore:
    """A held-out normal image that set the thresholds: its file name, SHA-256 and score."""

    name: str
    sha256: str
    score: float


@dataclass(frozen=True)
class Fingerprint:
    """What a detector scored on the probes (and the held-out normals) and what ran it."""

    settings: dict[str, Any]  # the detector's settings in full (``describe()`` without the runtime)
    dtype: str
    device: str
    versions: dict[str, str]  # installed package versions (absent: not installed)
    cpu: str
    weights: dict[str, str]  # encoder → digest of its weights (``encoders.digest``); empty where unknown
    probe_scores: list[float]
    probe_maps: list[list[float]]  # per probe: the map's mean, 99th percentile and maximum
    normals: list[NormalScore] = field(default_factory=list)
    version: int = FINGERPRINT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> Fingerprint:
        """Parse and check a stored fingerprint; a damaged one is a one-line error naming ``source``."""
        try:
            data = json.loads(text)
            normals = [NormalScore(**n) for n in data.pop("normals")]
            fingerprint = cls(normals=normals, **data)
            numbers = [*fingerprint.probe_scores, *(v for row in fingerprint.probe_maps for v in row),
                       *(n.score for n in normals)]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ClipfusionError(f"{source}: its fingerprint cannot be read ({exc}); write it again with "
                                  "`clipfusion calibrate`") from None
        if fingerprint.version != FINGERPRINT_VERSION or not all(isinstance(v, int | float) and math.isfinite(v)
                                                                    for v in numbers):
            raise ClipfusionError(f"{source}: its fingerprint is of another version or holds a number that is not "
                                  "finite; write it again with `clipfusion calibrate`")
        return fingerprint


def probe_images(seed: int = PROBE_SEED, count: int = PROBE_COUNT, size: int = PROBE_SIZE) -> list[np.ndarray]:
    """``count`` (size, size, 3) uint8 images made from ``seed`` alone: smooth colour fields, the last
    ones with a bright spot, so the maps have structure.  The same bytes on every machine (numpy's PCG64
    and Pillow's bicubic resize are exact integer-reproducible)."""
    rng = np.random.default_rng(seed)
    images = []
    for number in range(count):
        coarse = rng.integers(40, 216, size=(6, 6, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)).copy()
        if number:
            row, col = (int(v) for v in rng.integers(size // 8, size - size // 4, size=2))
            image[row:row + size // 8, col:col + size // 8] = 250
        images.append(image)
    return images


def cpu_name() -> str:
    """The CPU's model and the speed flags that decide its kernels (not the bfloat16 switch: a setting)."""
    cpu = cpu_info()
    return f"{cpu.model} ({' '.join(cpu.flags) or 'no speed flags'})"


def installed_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _settings(detector: Detector) -> dict[str, Any]:
    described = dict(getattr(detector, "describe", dict)())
    described.pop("runtime", None)
    described.pop("batch_size", None)  # how many images per call: the maps do not depend on it
    return dict(json.loads(json.dumps(described)))  # as stored: tuples become lists


def take_fingerprint(detector: Detector, category: str | None, normals: Sequence[NormalScore] = ()
                     ) -> Fingerprint:
    """The fingerprint of ``detector`` (fitted and calibrated, or loaded) run here on the probes."""
    prediction = detector.predict(probe_images(), category)
    maps = np.asarray(prediction.maps, dtype=np.float64)
    statistics = [[float(m.mean()), float(np.percentile(m, 99)), float(m.max())] for m in maps]
    runtime = getattr(detector, "runtime_", None)
    digests = getattr(detector, "weights_digests", None)
    return Fingerprint(
        settings=_settings(detector), dtype=str(getattr(detector, "precision", None) or "float32"),
        device=(runtime.device.split(":")[0] if runtime is not None else "cpu"), versions=installed_versions(),
        cpu=cpu_name(), weights=digests() if digests is not None else {},
        probe_scores=[float(s) for s in prediction.scores], probe_maps=statistics, normals=list(normals))


@dataclass(frozen=True)
class Finding:
    """One line of the comparison: what, as recorded, as found here, and whether it matters."""

    what: str
    recorded: str
    here: str
    changed: bool
    decisive: bool  # a change here means the thresholds may not hold, whatever the scores say


@dataclass(frozen=True)
class Comparison:
    """The verdict (:data:`SAME`, :data:`WITHIN` or :data:`DIFFERENT`), the largest score or map-statistic
    difference, the tolerance it was held to, and every finding."""

    verdict: str
    largest: float
    tolerance: float
    findings: list[Finding]

    @property
    def causes(self) -> list[Finding]:
        return [f for f in self.findings if f.changed]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def compare(recorded: Fingerprint, here: Fingerprint, scores_only: bool = False) -> Comparison:
    """``here`` (the same probes, and the normals found again) against ``recorded``.  ``scores_only``:
    ``here`` ran where settings and weights are not seen (an export, whose graphs fix the settings and hold
    the weights, checked by the manifest's checksums; a Ray replica): only what it scores is compared."""
    findings = []
    before, after = ({}, {}) if scores_only else (_flat(recorded.settings), _flat(here.settings))
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            findings.append(Finding(f"setting {key}", str(before.get(key, "-")), str(after.get(key, "-")), True, True))
    for encoder in [] if scores_only else sorted(recorded.weights.keys() | here.weights.keys()):
        old, new = recorded.weights.get(encoder, "-"), here.weights.get(encoder, "-")
        findings.append(Finding(f"weights {encoder}", old[:12], new[:12], old != new, True))
    findings.append(Finding("precision", f"{recorded.dtype} on {recorded.device}", f"{here.dtype} on {here.device}",
                            (recorded.dtype, recorded.device) != (here.dtype, here.device), False))
    findings.append(Finding("CPU", recorded.cpu, here.cpu, recorded.cpu != here.cpu, False))
    for package in sorted(recorded.versions.keys() | here.versions.keys()):
        old, new = recorded.versions.get(package, "-"), here.versions.get(package, "-")
        if old != new:
            findings.append(Finding(f"version {package}", old, new, True, False))

    differences = [abs(a - b) for a, b in zip(recorded.probe_scores, here.probe_scores, strict=True)]
    differences += [abs(a - b) for r, h in zip(recorded.probe_maps, here.probe_maps, strict=True)
                    for a, b in zip(r, h, strict=True)]
    found = {n.sha256: n.score for n in here.normals}
    normal_differences = [abs(n.score - found[n.sha256]) for n in recorded.normals if n.sha256 in found]
    largest = max([*differences, *normal_differences], default=0.0)
    findings.append(Finding("probe scores", _numbers(recorded.probe_scores), _numbers(here.probe_scores),
                            max(differences, default=0.0) > SAME_SCORE_TOLERANCE, False))
    if normal_differences:
        findings.append(Finding(f"held-out normal scores ({len(normal_differences)} of {len(recorded.normals)})",
                                "as fitted", f"largest difference {max(normal_differences):.2e}",
                                max(normal_differences) > SAME_SCORE_TOLERANCE, False))

    bf16 = "bfloat16" in (recorded.dtype, here.dtype) or "float16" in (recorded.dtype, here.dtype)
    tolerance = BF16_SCORE_TOLERANCE if bf16 else SAME_SCORE_TOLERANCE
    if any(f.changed and f.decisive for f in findings) or largest > tolerance:
        verdict = DIFFERENT
    elif largest > SAME_SCORE_TOLERANCE or (recorded.dtype, recorded.device) != (here.dtype, here.device):
        verdict = WITHIN
    else:
        verdict = SAME
    return Comparison(verdict, largest, tolerance, findings)


def _numbers(values: Sequence[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)
