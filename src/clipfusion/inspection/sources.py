"""Reading what an inspection is asked to look at: a local file, a URI or an image already in memory,
each timed, an unreadable one kept with its reason (never a whole batch lost)."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipfusion.data.base import MAX_PIXELS, read_rgb
from clipfusion.errors import ClipfusionError, ImageReadError
from clipfusion.images import ImageLike, to_rgb
from clipfusion.object_store import is_uri, read_uri_rgb


@dataclass
class Decoded:
    """One input as read for scoring: its name (an absolute path, a URI, or an upload's file name), its
    (H, W, 3) uint8 pixels (None if unreadable: ``reason`` says why) and the seconds reading took."""

    source: str
    image: np.ndarray | None
    seconds: float = 0.0
    reason: str = ""


def source_name(path: str | os.PathLike[str]) -> str:
    """How rows name an image file: its absolute path, so a resumed run recognises it from any folder;
    a URI as given."""
    text = os.fsdecode(path)
    return text if is_uri(text) else os.path.abspath(text)


def read_source(item: ImageLike, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Decoded:
    """One path, URI, Pillow image or array → :class:`Decoded` (an unreadable file or a bad array keeps
    its reason); ``name`` names an in-memory image (default ``image``)."""
    start = time.perf_counter()
    if isinstance(item, str | os.PathLike):
        source = source_name(item)
        try:
            image = read_uri_rgb(source, max_pixels) if is_uri(source) else read_rgb(Path(source), max_pixels)
        except ImageReadError as exc:
            return Decoded(source, None, time.perf_counter() - start, exc.reason)
        return Decoded(source, image, time.perf_counter() - start)
    try:
        image = to_rgb(item)
    except ClipfusionError as exc:
        return Decoded(name or "image", None, time.perf_counter() - start, str(exc))
    if image.shape[0] * image.shape[1] > max_pixels:
        return Decoded(name or "image", None, time.perf_counter() - start,
                       f"{image.shape[1]}x{image.shape[0]} pixels, above the limit of {max_pixels}")
    return Decoded(name or "image", image, time.perf_counter() - start)


def read_sources(sources: Sequence[ImageLike], max_pixels: int = MAX_PIXELS) -> list[Decoded]:
    """:func:`read_source` of each, in order; in-memory images are named ``image 0``, ``image 1``..."""
    return [read_source(item, max_pixels, f"image {index}") for index, item in enumerate(sources)]
