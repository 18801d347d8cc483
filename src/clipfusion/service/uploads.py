"""Reading the images of an inspect request: multipart files or one raw body, within the limits."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from clipfusion.data.base import decode_rgb
from clipfusion.errors import ImageReadError, ImageTooLargeError
from clipfusion.service.errors import ServiceError
from clipfusion.service.inspector import Upload
from clipfusion.service.settings import ServiceSettings

MAX_FILES = 64  # images in one request


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_large = ServiceError(413, "upload_too_large", f"the upload is larger than the limit of {limit} bytes "
                                                      "(--max-upload-mb)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(files: list[tuple[str, bytes]], settings: ServiceSettings, received: float) -> list[Upload]:
    uploads = []
    for name, data in files:
        try:
            uploads.append(Upload(name, decode_rgb(data, name, settings.max_pixels), data, received))
        except ImageTooLargeError as exc:
            raise ServiceError(413, "image_too_large", f"{name}: {exc.reason}") from None
        except ImageReadError as exc:
            raise ServiceError(422, "unreadable_image", f"{name}: {exc.reason}") from None
    return uploads


async def read_uploads(request: Request, settings: ServiceSettings) -> list[Upload]:
    """Every image of the request, decoded (in a worker thread); all or none: one unreadable file
    refuses the request, naming it."""
    received = time.perf_counter()
    kind = request.headers.get("content-type", "")
    body = await _body(request, settings.max_upload_bytes)
    files: list[tuple[str, bytes]] = []
    if kind.startswith("multipart/form-data"):
        request._body = body  # starlette's form parser reads this body, which we already bounded
        form = await request.form(max_files=MAX_FILES)
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((Path(value.filename or "upload").name, await value.read()))
    elif kind.startswith("image/") or kind.startswith("application/octet-stream"):
        name = Path(request.query_params.get("filename") or request.headers.get("x-filename") or "upload").name
        files.append((name, body))
    else:
        raise ServiceError(415, "unsupported_media_type", "send images as multipart/form-data (field 'files') or "
                                                          f"one raw image body (image/*), not {kind or 'no type'}")
    if not files or not any(data for _, data in files):
        raise ServiceError(422, "no_image", "the request holds no image")
    return await run_in_threadpool(_decode, files, settings, received)
