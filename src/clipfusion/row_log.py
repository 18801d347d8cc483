"""Rows streamed to disk as they are produced: ``results.jsonl`` (the record, one JSON object per
line, each line flushed and fsynced before the next image) and ``results.csv`` (the same rows for
spreadsheets).  A run killed at any moment loses at most the row being written: reopening drops a
torn last line and rebuilds the CSV from the JSON lines, so a resumed run starts from a consistent
state and never scores an image twice."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from clipfusion.outputs import csv_text, json_safe, write_atomic

logger = logging.getLogger(__name__)
JSONL, CSV = "results.jsonl", "results.csv"


def _csv_cell(value: Any) -> Any:
    """Lists and dicts (regions) as compact JSON inside one CSV cell."""
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else value


def read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a JSON-lines file and the byte length they span (a torn or unreadable
    tail, from a kill mid-write, is not counted)."""
    rows: list[dict[str, Any]] = []
    length = 0
    data = path.read_bytes() if path.is_file() else b""
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line.decode("utf-8", errors="surrogateescape")))
        except ValueError:
            break
        length += len(line)
    if length < len(data):
        logger.warning("%s: dropped a torn last row (%d bytes) left by an interrupted run", path, len(data) - length)
    return rows, length


class RowLog:
    """Append-only results in ``folder``; ``rows`` holds every row written so far (earlier runs' too)."""

    def __init__(self, folder: Path, fields: Sequence[str]) -> None:
        self.fields = list(fields)
        self.rows, length = read_rows(folder / JSONL)
        if (folder / JSONL).is_file():
            os.truncate(folder / JSONL, length)
        write_atomic(folder / CSV, csv_text(self.fields, [self._csv_row(r) for r in self.rows]))
        self._jsonl: IO[bytes] = (folder / JSONL).open("ab")
        self._csv: IO[bytes] = (folder / CSV).open("ab")

    def _csv_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {name: _csv_cell(row.get(name)) for name in self.fields}

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` to both files and make the JSON line durable before returning."""
        line = json.dumps(json_safe(row), allow_nan=False) + "\n"
        self._jsonl.write(line.encode("utf-8", errors="surrogateescape"))
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        buffer = io.StringIO(newline="")
        csv.DictWriter(buffer, self.fields).writerow(self._csv_row(json_safe(row)))
        self._csv.write(buffer.getvalue().encode("utf-8", errors="surrogateescape"))
        self._csv.flush()
        self.rows.append(row)

    def close(self) -> None:
        self._jsonl.close()
        self._csv.close()

    def __enter__(self) -> RowLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
