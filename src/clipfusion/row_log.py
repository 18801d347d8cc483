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
JSONL, CSV, PARTS = "results.jsonl", "results.csv", "parts"
# Rows per Parquet part: large enough for data tools to read efficiently, small enough to be
# written often (a part is written once it is full, the last one again until it is).
PART_ROWS = 10_000


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


class ParquetParts:
    """The rows of ``results.jsonl`` also as Parquet files in ``folder``: ``part-<first row>.parquet``
    holds rows [first, first + PART_ROWS).  The JSON lines stay the record: a part is derived from
    them (regions as JSON text, like the CSV, so every part has one schema), written atomically,
    and rewritten while it is the incomplete last one, so a resumed run's parts stay consistent."""

    def __init__(self, folder: Path, fields: Sequence[str], numbers: Sequence[str], part_rows: int = PART_ROWS
                 ) -> None:
        """``numbers``: the fields stored as float64; the others are text (lists as JSON text)."""
        self.folder, self.fields, self.numbers, self.part_rows = folder, list(fields), set(numbers), part_rows
        folder.mkdir(parents=True, exist_ok=True)
        self._complete: set[int] = set()  # first rows of the full parts written by this object

    def _path(self, first: int) -> Path:
        return self.folder / f"part-{first:09d}.parquet"

    def sync(self, rows: Sequence[dict[str, Any]], final: bool = False) -> None:
        """Write each full part not yet written (it may be left from an earlier run: it is then
        rewritten once) and, when ``final``, the incomplete last part."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(name, pa.float64() if name in self.numbers else pa.string()) for name in self.fields])
        for first in range(0, len(rows), self.part_rows):
            chunk = rows[first:first + self.part_rows]
            full = len(chunk) == self.part_rows
            if first in self._complete or not (full or final):
                continue
            columns = {name: [_csv_cell(json_safe(row.get(name))) for row in chunk] for name in self.fields}
            buffer = pa.BufferOutputStream()
            pq.write_table(pa.table(columns, schema=schema), buffer)
            write_atomic(self._path(first), buffer.getvalue().to_pybytes())
            if full:
                self._complete.add(first)
        for stale in self.folder.glob("part-*.parquet"):  # from a longer earlier run (rows are never removed)
            first = int(stale.stem.removeprefix("part-")) if stale.stem.removeprefix("part-").isdigit() else -1
            if first >= len(rows) or first % self.part_rows:
                stale.unlink()
