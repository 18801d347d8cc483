"""Building a few-shot memory bank from a folder of normal images, for ``predict --memory``."""
from __future__ import annotations

from pathlib import Path

from clipfusion.data.base import read_images
from clipfusion.errors import ClipfusionError
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.tasks.inputs import draw_references


def fit_memory(detector: CLIPFusion, normal: str, category: str, shots: int, seed: int, out: str
               ) -> tuple[Path, list[str]]:
    """Draw ``shots`` references from ``normal`` with ``seed``, fit, save the bank; (path, reference names)."""
    if shots < 1:
        raise ClipfusionError("--shots must be >= 1 for a memory bank")
    references = draw_references(normal, shots, seed)
    paths, images, _ = read_images(references.used)
    if not images:
        raise ClipfusionError(f"none of the drawn references in {normal} could be read")
    names = [p.name for p in paths]
    detector.fit(images, category, reference_names=names)
    return detector.save_memory(out), names
