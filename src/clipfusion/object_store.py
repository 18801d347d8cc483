"""Images named by URIs (``s3://bucket/prefix``, ``gs://...``, ``file:///...``), listed and read through
pyarrow's file systems, the layer Ray Data itself reads through.  pyarrow comes with the ``ray`` extra;
credentials are pyarrow's usual ones (AWS_* variables or ~/.aws for S3, Google's default credentials
for GCS)."""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from clipfusion.data.base import IMAGE_EXTENSIONS, MAX_PIXELS, decode_rgb
from clipfusion.errors import ClipfusionError, ImageReadError

_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(text: str) -> bool:
    """``scheme://...`` (a local path never has a scheme, even on Windows: ``C:\\`` has no ``//``)."""
    return _SCHEME.match(text) is not None


def _file_system(uri: str) -> tuple[Any, str]:
    try:
        from pyarrow import fs
    except ImportError:
        raise ClipfusionError(f"{uri}: reading URIs needs pyarrow: pip install 'clipfusion[ray]'") from None
    try:
        return fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ClipfusionError(f"{uri}: {exc}") from None


def _uri_of(uri: str, path: str) -> str:
    """The URI of ``path`` (as the file system names it) in the scheme and authority of ``uri``."""
    return f"{uri.split('://', 1)[0]}://{path}"


def list_uri_images(uri: str) -> list[str]:
    """Image URIs at ``uri``: the object itself, or every image below the prefix, sorted by name."""
    filesystem, path = _file_system(uri)  # first: it says how to install pyarrow when it is missing
    from pyarrow import fs

    try:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            found = [path]
        elif info.type == fs.FileType.Directory:
            found = sorted(entry.path for entry in filesystem.get_file_info(fs.FileSelector(path, recursive=True))
                           if entry.type == fs.FileType.File)
        else:
            found = []
    except OSError as exc:
        raise ClipfusionError(f"{uri}: cannot list it ({exc}); check the address and the credentials") from None
    return [_uri_of(uri, p) for p in found
            if PurePosixPath(p).suffix.lower() in IMAGE_EXTENSIONS and not PurePosixPath(p).name.startswith(".")]


def read_uri_rgb(uri: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image at ``uri`` as (H, W, 3) uint8 RGB; ImageReadError (with the reason) when it cannot be read."""
    try:
        filesystem, path = _file_system(uri)
        with filesystem.open_input_file(path) as handle:
            data = handle.read()
    except (ClipfusionError, OSError) as exc:
        raise ImageReadError(uri, str(exc)) from None
    return decode_rgb(data, uri, max_pixels)
