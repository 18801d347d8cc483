"""Writing output files: strict JSON (no NaN), and atomic replacement so a reader never sees half a file."""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


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


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a unique temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a partial one; two writers never
    share a temporary name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(fieldnames: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """CSV (header, then one line per row, ``\\r\\n`` endings as the csv module writes) as a string,
    ready for :func:`write_atomic`."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
