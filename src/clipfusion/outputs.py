"""Writing output files: strict JSON, CSV text, and atomic replacement so a reader never sees half a file."""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.errors import ClipfusionError


def json_safe(value: Any) -> Any:
    """NaN/inf → null (JSON has no NaN), NumPy scalars → Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _process_umask() -> int:
    """The process's umask, read once (setting it back at once: Python can only read it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# read at import, before any thread of this process writes files with it
UMASK = _process_umask()


def _final_mode(path: Path) -> int:
    """The permissions ``path`` gets: an existing file's own, else what ``open()`` would give a new one
    (0o666 less the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~UMASK


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a unique temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a partial one; two writers never
    share a temporary name.  The file gets the permissions a plain write would give it (mkstemp's
    temporary files are 0o600, which would hide results from the line's other accounts).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            # surrogateescape: a file name that is not valid UTF-8 is written back as its original bytes
            stream.write(data.encode("utf-8", errors="surrogateescape") if isinstance(data, str) else data)
        os.chmod(tmp, _final_mode(path))  # os.chmod, not fchmod: Windows (the exported runtime) has only this
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# What to do about an operating-system error, by its errno: "free space" is no help for a permission.
OS_ADVICE = {errno.ENOSPC: "free space on that disk, or choose another --out",
             errno.EDQUOT: "free space within your quota, or choose another --out",
             errno.EACCES: "you may not write there: choose another --out, or change its permissions",
             errno.EPERM: "the system does not permit it there: choose another --out",
             errno.EROFS: "that file system is read-only: choose another --out"}


def os_advice(exc: OSError) -> str:
    """What the user can do about ``exc``, by its errno."""
    return OS_ADVICE.get(exc.errno or 0, "check that path, or choose another --out")


def probe_writable(target: Path, option: str = "--out") -> None:
    """A one-line error unless a file can be created (and removed) where ``target`` goes: in ``target`` if it
    is a folder that exists, else in its nearest existing ancestor.  Found before any model loads, with
    the advice its errno calls for; nothing is left behind."""
    folder = target if target.is_dir() else next((p for p in target.parents if p.is_dir()), Path("."))
    try:
        handle, probe = tempfile.mkstemp(prefix=".clipfusion-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ClipfusionError(f"{option} {target}: cannot write in {folder} ({exc.strerror}); {os_advice(exc)}") \
            from None


def csv_text(fieldnames: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """CSV (header, then one line per row, ``\\r\\n`` endings as the csv module writes) as a string,
    ready for :func:`write_atomic`."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_json(path: Path, what: str, advice: str = "delete it, or pass --overwrite to start afresh") -> Any:
    """Parse a JSON file clipfusion wrote earlier; a damaged one is a one-line error naming it, with
    ``advice`` (the default fits a run's own files in ``--out``; an input's differs)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    except (OSError, ValueError) as exc:
        raise ClipfusionError(f"cannot read {what} {path} ({exc}); {advice}") from None


def json_text(value: Any) -> str:
    """Strict JSON (NaN and infinities as null), indented."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """The SHA-256 of ``value`` as canonical JSON (keys sorted, no spaces): the same for any layout of
    the same content, so a digest can sit inside the document it covers."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
