"""What every dataset yields, and the image/mask readers they share.

Datasets only index files (cheap); pixels are read when a :class:`SampleRef` is loaded, so a
category of 1000 images costs no memory until it is evaluated, and one unreadable file costs one
sample, not the run.
"""
from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipfusion.errors import DatasetError, ImageReadError, ImageTooLargeError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NORMAL_DEFECT = "good"
# Images above this many pixels are skipped with the reason (--max-pixels): a 108-megapixel frame
# costs minutes and gigabytes.  100 MP admits today's largest industrial area-scan cameras.
MAX_PIXELS = 100_000_000
_PILLOW_LIMIT = threading.Lock()


@dataclass(frozen=True)
class SampleRef:
    """An indexed test image: where its pixels and ground truth are, not the pixels themselves.

    ``mask_path`` is None for normal images (their mask is all zero) and for anomalous images of a
    dataset that has no pixel ground truth (``has_mask`` is then False).
    """

    image_path: Path
    label: int
    category: str
    defect: str
    mask_path: Path | None = None
    has_mask: bool = True

    def load(self, max_pixels: int = MAX_PIXELS) -> Sample:
        """Read the image (RGB uint8) and its binary mask; raises ImageReadError or DatasetError."""
        image = read_rgb(self.image_path, max_pixels)
        height, width = image.shape[:2]
        if self.mask_path is not None:
            mask = read_mask(self.mask_path)
            if mask.shape != (height, width):
                raise DatasetError(
                    f"mask {self.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{self.image_path} is {width}x{height}; the ground truth must have the image's size"
                )
        elif self.has_mask:
            mask = np.zeros((height, width), dtype=bool)
        else:
            mask = None
        return Sample(image, mask, self.label, str(self.image_path), self.category, self.defect)


@dataclass
class Sample:
    """One loaded test image.

    image: (H, W, 3) uint8 RGB.  mask: (H, W) bool, True = anomalous pixel, or None when the
    dataset has no pixel ground truth for it.  label: 0 normal, 1 anomalous.
    """

    image: np.ndarray
    mask: np.ndarray | None
    label: int
    path: str
    category: str
    defect: str


class AnomalyDataset:
    """Index of one dataset root: categories, their test images and their normal training images."""

    name = "base"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist or is not a folder")

    def categories(self) -> list[str]:
        raise NotImplementedError

    def test_samples(self, category: str) -> list[SampleRef]:
        raise NotImplementedError

    def train_images(self, category: str) -> list[Path]:
        """Normal training images (the pool few-shot references are drawn from)."""
        raise NotImplementedError

    def check_categories(self, requested: Sequence[str] | None) -> list[str]:
        """The requested categories (all available ones when None), or a DatasetError naming the bad ones."""
        available = self.categories()
        if not available:
            raise DatasetError(f"no categories found under {self.root} for the {self.name} layout")
        names = list(dict.fromkeys(requested or available))
        if requested and len(names) < len(requested):
            logger.warning("repeated categories ignored: each runs once (%s)", ", ".join(names))
        for name in names:
            check_path_component(name, f"category of {self.root}")
        if not requested:
            return names
        unknown = [c for c in requested if c not in available]
        if unknown:
            raise DatasetError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {self.root}; "
                f"available: {', '.join(available)}"
            )
        return names


def check_path_component(name: str, what: str) -> str:
    """``name`` if it can be one folder or file name inside an output folder, else a DatasetError:
    no separators, no ``.``/``..``, not empty, no NUL, so that nothing lands outside ``--out``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise DatasetError(f"{what} {name!r} cannot be a folder name (a path separator, '..' or empty); "
                           "rename it in the dataset or its index file")
    return name


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


@contextmanager
def _own_size_limit() -> Iterator[None]:
    """Pillow's decompression-bomb check off while a file is opened: ``max_pixels`` is checked instead,
    before any pixel is decoded, and may be set above Pillow's fixed ≈ 179 MP."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(path: Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> Image.Image:
    """Open ``path`` (or ``data``, the bytes of a file called ``path``), check the size, decode (so
    truncated files fail here, with their name) and apply the EXIF orientation, so that pixels are in
    the orientation viewers show and masks are drawn in."""
    try:
        with _own_size_limit():
            image = Image.open(path if data is None else io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(path, f"{width}x{height} is {width * height / 1e6:.0f} megapixels, above the "
                                           f"limit of {max_pixels / 1e6:.0f} (raise it with --max-pixels)")
        image.load()
        return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, str(exc) or type(exc).__name__) from None


def read_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read any image file as (H, W, 3) uint8 RGB, upright by its EXIF orientation (see :func:`pil_to_rgb`).

    Files above ``max_pixels`` raise ImageReadError before any pixel is decoded.
    """
    return pil_to_rgb(_open(Path(path), max_pixels))


def encoded_size(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The (width, height) that the bytes of the image file ``name`` would decode to, read from its header
    alone (no pixel is decoded); ImageReadError when it is no image or above ``max_pixels``."""
    try:
        with _own_size_limit(), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(name, str(exc) or type(exc).__name__) from None
    if width * height > max_pixels:
        raise ImageTooLargeError(name, f"{width}x{height} is {width * height / 1e6:.0f} megapixels, above the "
                                       f"limit of {max_pixels / 1e6:.0f} (raise it with --max-pixels)")
    return width, height


def decode_rgb(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """:func:`read_rgb` for the bytes of an uploaded file called ``name``."""
    return pil_to_rgb(_open(Path(name), max_pixels, data))


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A Pillow image as (H, W, 3) uint8 RGB.

    Grayscale, palette, RGBA/LA (alpha dropped) and CMYK are converted by Pillow; 16-bit and 32-bit
    integer grayscale are scaled from their full range to 8 bits (Pillow's own conversion clips).
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") or values.max() <= 65535 else values.max()
        gray = np.clip(np.round(values / full_scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        span = max(float(values.max() - values.min()), 1e-12)
        gray = np.round((values - values.min()) / span * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_images(paths: Sequence[Path], max_pixels: int = MAX_PIXELS
                ) -> tuple[list[Path], list[np.ndarray], list[tuple[str, str]]]:
    """Read what can be read: (paths read, their RGB images, [(path, reason)] of the rest, logged)."""
    kept, images, skipped = [], [], []
    for path in paths:
        try:
            images.append(read_rgb(path, max_pixels))
            kept.append(path)
        except ImageReadError as exc:
            logger.warning("skipped %s", exc)
            skipped.append((str(path), exc.reason))
    return kept, images, skipped


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as (H, W) bool: any non-zero value is anomalous.

    ``> 0`` rather than ``> 127`` because VisA masks are label-valued (1, 2, ...) and look black.
    """
    image = _open(Path(path))
    values = np.asarray(image)
    if values.ndim == 3:
        values = values.max(axis=2)
    return values > 0


def sample_references(train_images: Sequence[Path], k: int, seed: int) -> list[Path]:
    """Draw ``k`` few-shot references from the normal training images, without replacement.

    Deterministic for a given seed and file list (the list is sorted first, so the order in which
    the file system lists files does not matter).
    """
    pool = sorted(train_images)
    if k < 0:
        raise ValueError("k must be >= 0")
    if k > len(pool):
        raise DatasetError(f"{k} references requested but only {len(pool)} normal training images exist")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=k, replace=False)
    return [pool[i] for i in picked]
