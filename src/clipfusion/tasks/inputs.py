"""Which files a command reads: images from files, folders and glob patterns, and a seeded draw of
few-shot references from a folder of normal images (the rest held out, e.g. for thresholds)."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipfusion.data.base import IMAGE_EXTENSIONS, sample_references
from clipfusion.errors import ClipfusionError
from clipfusion.object_store import is_uri, list_uri_images
from clipfusion.outputs import file_sha256

if TYPE_CHECKING:
    import numpy as np

    from clipfusion.inspection.models import ModelFile

logger = logging.getLogger(__name__)


def walk_files(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, following folder links but entering each real folder once, so a
    link loop ends (it is logged) instead of repeating files or running forever.  Sorted per folder."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            logger.warning("skipped %s: a folder link loop (already visited as %s)", root, real)
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield from (Path(root) / name for name in sorted(files))


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A glob pattern as a regex over '/'-separated paths: ``**/`` any folders (none included), ``*`` and
    ``?`` within one name, ``[...]`` a character class (as glob.glob with recursive=True)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _glob(pattern: str) -> list[Path]:
    """Files matching ``pattern``, found with :func:`walk_files` below its first folder holding a wildcard."""
    parts = Path(pattern).parts
    fixed = next((n for n, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    if not base.is_dir():
        return []
    regex = _pattern_regex(Path(pattern).as_posix())
    return [p for p in walk_files(base) if regex.match(p.as_posix())]


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from files, folders (recursive) and glob patterns, in the given order, each file once
    (by its real path, so links to one file count once)."""
    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = [p for p in walk_files(path) if p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(p for p in _glob(str(path)) if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not matches:
            raise ClipfusionError(f"no image files found at {item}")
        for match in matches:
            found.setdefault(os.path.realpath(match), match)
    return list(found.values())


def collect_sources(inputs: Sequence[str]) -> list[str]:
    """:func:`collect_images` that also takes object-store URIs (``s3://bucket/prefix``...): absolute
    paths of local images and the URIs of remote ones, in the given order, each once (local files by
    their real path, as there)."""
    found: dict[str, str] = {}
    for item in inputs:
        if is_uri(item):
            uris = list_uri_images(item)
            if not uris:
                raise ClipfusionError(f"no image files found at {item}")
            for uri in uris:
                found.setdefault(uri, uri)
        else:
            for path in collect_images([item]):
                found.setdefault(os.path.realpath(path), os.path.abspath(os.fsdecode(path)))
    return list(found.values())


@dataclass
class References:
    """Few-shot references drawn from a folder of normal images, and the normal images held out."""

    used: list[Path]
    held_out: list[Path]


def draw_references(normal_dir: str | Path, shots: int, seed: int) -> References:
    pool = collect_images([str(normal_dir)])
    used = sample_references(pool, shots, seed) if shots > 0 else []
    return References(used, [p for p in pool if p not in set(used)])


def held_out_normals(normal_dir: str, references: set[str]) -> list[Path]:
    """The images of ``normal_dir`` that are not among a model's ``references`` (SHA-256s: recognised by
    content, whatever their names); a one-line error when none is left."""
    pool = collect_images([normal_dir])
    held_out = [path for path in pool if file_sha256(path) not in references]
    if not held_out:
        raise ClipfusionError(f"{normal_dir} holds only the model's references ({len(pool)} images); give normal "
                              "images it was not fitted on")
    return held_out


def int8_check_images(model: ModelFile | None, normal: str | None, force: bool) -> tuple[list[np.ndarray], str]:
    """The images ``export --weights int8`` is checked on, and what they are: the held-out normals of
    ``normal`` (the model's references left out), or, where there are no thresholds to keep (zero-shot) or
    ``force`` skips them, the fingerprint's probe images."""
    from clipfusion.inspection.fingerprint import probe_images
    from clipfusion.inspection.sources import read_sources

    if normal is None:
        if model is not None and not force:
            raise ClipfusionError("--weights int8 moves scores, and the export is kept only if no decision flips on "
                                  "normal images: add --normal DIR (normal images the model was not fitted on), or "
                                  "--force to write it checked on probe images only")
        return probe_images(), "probe images"
    references = set() if model is None or model.card is None else {r["sha256"] for r in model.card.references}
    images = [item.image for item in read_sources(held_out_normals(normal, references)) if item.image is not None]
    if not images:
        raise ClipfusionError(f"--normal {normal} holds no readable image besides the model's references")
    return images, "held-out normal images"
