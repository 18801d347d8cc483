"""Building a few-shot memory bank from a folder of normal images, for ``predict --memory``."""
from __future__ import annotations

import os
from pathlib import Path

from clipfusion.data.base import MAX_PIXELS, read_images
from clipfusion.errors import ClipfusionError
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.tasks.inputs import draw_references


def check_writable_file(path: Path) -> None:
    """A one-line error unless ``path`` can be written as a file (its folder exists or can be made)."""
    if path.is_dir():
        raise ClipfusionError(f"--out {path} is a folder; give a file name such as {path / 'bank.safetensors'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClipfusionError(f"cannot create the folder {folder} for --out: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ClipfusionError(f"cannot write in {folder} (permission denied); choose another --out")


def fit_memory(detector: CLIPFusion, normal: str, category: str, shots: int, seed: int, out: str,
               max_pixels: int = MAX_PIXELS) -> tuple[Path, list[str]]:
    """Draw ``shots`` references from ``normal`` with ``seed``, fit, save the bank; (path, reference names)."""
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
    detector.fit(images, category, reference_names=names)
    return detector.save_memory(out), names
