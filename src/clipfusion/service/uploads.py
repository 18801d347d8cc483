"""Reading the images of an inspect request: multipart files or one raw body, within the limits.

The body is read first (bounded by ``--max-upload-mb``), then each file's size from its header alone,
so that the request's pixels can be admitted (``admission.PixelBudget``) before any is decoded.  Each
file is taken or refused on its own: an unreadable or too large one becomes that item's error, never
the request's, unless no item is left.
"""
from __future__ import annotations

import asyncio
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from clipfusion.data.base import decode_rgb, encoded_size
from clipfusion.errors import ImageReadError, ImageTooLargeError
from clipfusion.service.errors import ServiceError
from clipfusion.service.settings import ServiceSettings

MAX_FILES = 64  # images in one request
MAX_NAME = 255  # characters of a file name kept (the database column holds 500)
DISCARD_FACTOR = 64  # a body declared larger than this many upload limits is not read away, its connection closed


@dataclass
class Upload:
    """A decoded uploaded image: (H, W, 3) uint8, its file name (made safe) and bytes, when its request
    arrived and the request's id (for the log lines of the batch thread that inspects it)."""

    filename: str
    image: np.ndarray
    data: bytes
    received: float  # time.perf_counter() when its request was read
    request_id: str = ""
    idempotency_key: str | None = None  # the request's key (``KEY/N`` for the N-th of several images)


@dataclass
class ItemError:
    """Why one image of a request has no inspection: an HTTP status it would have alone, a stable code."""

    filename: str
    status: int
    code: str
    detail: str


@dataclass
class Received:
    """One file of a request: its safe name, its bytes, and the pixels its header declares (0 if refused)."""

    filename: str
    data: bytes
    pixels: int = 0
    error: ItemError | None = None


def safe_filename(name: str) -> str:
    """A file name as the service keeps it: its last path part, characters that are not printable (NUL,
    control characters, lone surrogates) written as escapes (``\\x00``), at most MAX_NAME characters (the
    start and the suffix kept)."""
    name = Path(name.replace("\\", "/")).name or "upload"
    escaped = "".join(c if c.isprintable() and unicodedata.category(c) != "Cs" else
                      c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in name)
    if len(escaped) > MAX_NAME:
        suffix = Path(escaped).suffix[:16]
        escaped = escaped[:MAX_NAME - len(suffix) - 1] + "…" + suffix
    return escaped


async def _body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed),
    and with 408 when ``timeout`` seconds pass without a byte of it (a stalled client holds nothing)."""
    declared = request.headers.get("content-length")
    too_large = ServiceError(413, "upload_too_large", f"the upload is larger than the limit of {limit} bytes "
                                                      "(--max-upload-mb)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # the connection stays open and uvicorn reads the rest of the body away: closing it with the body
        # still arriving would reset it, and the client would never read this answer; only a body far too
        # large to be worth reading closes it
        if int(declared) > DISCARD_FACTOR * limit:
            too_large.headers = {"Connection": "close"}
        raise too_large
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ServiceError(408, "body_timeout", f"no byte of the upload arrived for {timeout:g} s "
                                                    "(--read-timeout)", headers={"Connection": "close"}) from None
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_files(request: Request, settings: ServiceSettings) -> list[Received]:
    """The files of the request, not decoded: multipart files (any field name) or one raw image body."""
    kind = request.headers.get("content-type", "")
    body = await _body(request, settings.max_upload_bytes, settings.read_timeout)
    files: list[Received] = []
    if kind.startswith("multipart/form-data"):
        request._body = body  # starlette's form parser reads this body, which we already bounded
        form = await request.form(max_files=MAX_FILES)
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append(Received(safe_filename(value.filename or "upload"), await value.read()))
    elif kind.startswith("image/") or kind.startswith("application/octet-stream"):
        name = request.query_params.get("filename") or request.headers.get("x-filename") or "upload"
        files.append(Received(safe_filename(name), body))
    else:
        raise ServiceError(415, "unsupported_media_type", "send images as multipart/form-data (field 'files') or "
                                                          f"one raw image body (image/*), not {kind or 'no type'}")
    if not files or not any(item.data for item in files):
        raise ServiceError(422, "no_image", "the request holds no image")
    return files


def measure(files: list[Received], settings: ServiceSettings) -> None:
    """Each file's pixels from its header (nothing decoded); a file that is no image or too large gets
    its item error."""
    for item in files:
        try:
            width, height = encoded_size(item.data, item.filename, settings.max_pixels)
            item.pixels = width * height
        except ImageTooLargeError as exc:
            item.error = ItemError(item.filename, 413, "image_too_large", f"{item.filename}: {exc.reason}")
        except ImageReadError as exc:
            item.error = ItemError(item.filename, 422, "unreadable_image", f"{item.filename}: {exc.reason}")


def decode(files: list[Received], settings: ServiceSettings, received: float, request_id: str
           ) -> list[Upload | ItemError]:
    """Every admitted file decoded, in order (the refused ones as their errors)."""
    out: list[Upload | ItemError] = []
    for item in files:
        if item.error is not None:
            out.append(item.error)
            continue
        try:
            out.append(Upload(item.filename, decode_rgb(item.data, item.filename, settings.max_pixels), item.data,
                              received, request_id))
        except ImageReadError as exc:  # a header that promised more than the file holds
            out.append(ItemError(item.filename, 422, "unreadable_image", f"{item.filename}: {exc.reason}"))
    return out
