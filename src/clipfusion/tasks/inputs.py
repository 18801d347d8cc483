"""Which files a command reads: images from files, folders and glob patterns, and a seeded draw of
few-shot references from a folder of normal images (the rest held out, e.g. for thresholds)."""
from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipfusion.data.base import IMAGE_EXTENSIONS, sample_references
from clipfusion.errors import ClipfusionError


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from files, folders (recursive) and glob patterns, in the given order, without repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise ClipfusionError(f"no image files found at {item}")
        found += [m for m in matches if m.suffix.lower() in IMAGE_EXTENSIONS or path.is_file()]
    return list(dict.fromkeys(found))


@dataclass
class References:
    """Few-shot references drawn from a folder of normal images, and the normal images held out."""

    used: list[Path]
    held_out: list[Path]


def draw_references(normal_dir: str | Path, shots: int, seed: int) -> References:
    pool = collect_images([str(normal_dir)])
    used = sample_references(pool, shots, seed) if shots > 0 else []
    return References(used, [p for p in pool if p not in set(used)])
