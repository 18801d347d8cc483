"""What travels between the stages of ``predict --engine ray``: NumPy arrays and small JSON records, one
``.npz`` per batch, read back with ``allow_pickle=False`` — never pickled objects, so a stage can only
ever receive data, whatever sent it, and a worker and a driver of different code agree on a plain format.

A batch is ``records`` (one JSON object per image: names, numbers, regions, reasons) and arrays named
``<index>.<field>`` (the image's pixels, its maps and mask, its rendered files' bytes).
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from clipfusion.decisions import Region
from clipfusion.inspection.core import Inspection
from clipfusion.inspection.sources import Decoded
from clipfusion.inspection.writer import Outcome, Rendered

RECORDS = "records"
INSPECTION_ARRAYS = ("image", "anomaly_map", "raw_map", "mask")


def pack(records: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> bytes:
    """``records`` (JSON) and ``arrays`` in one uncompressed ``.npz``."""
    contents: dict[str, Any] = {RECORDS: np.frombuffer(json.dumps(records).encode(), np.uint8), **arrays}
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **contents)
    return buffer.getvalue()


def unpack(data: bytes) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The records and arrays of :func:`pack` (no pickle is ever loaded)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    return json.loads(arrays.pop(RECORDS).tobytes()), arrays


def pack_decoded(items: Sequence[Decoded]) -> bytes:
    records = [{"source": item.source, "seconds": item.seconds, "reason": item.reason} for item in items]
    return pack(records, {f"{index}.image": item.image for index, item in enumerate(items) if item.image is not None})


def unpack_decoded(data: bytes) -> list[Decoded]:
    records, arrays = unpack(data)
    return [Decoded(record["source"], arrays.get(f"{index}.image"), record["seconds"], record["reason"])
            for index, record in enumerate(records)]


def pack_inspections(items: Sequence[Inspection]) -> bytes:
    records, arrays = [], {}
    for index, item in enumerate(items):
        record = {field.name: getattr(item, field.name) for field in fields(item)
                  if field.name not in INSPECTION_ARRAYS}  # not asdict: it would deep-copy the arrays
        record["regions"] = None if item.regions is None else [asdict(region) for region in item.regions]
        records.append(record)
        for name in INSPECTION_ARRAYS:
            value = getattr(item, name)
            if value is not None:
                arrays[f"{index}.{name}"] = value
    return pack(records, arrays)


def unpack_inspections(data: bytes) -> list[Inspection]:
    records, arrays = unpack(data)
    items = []
    for index, record in enumerate(records):
        regions = record.pop("regions")
        item = Inspection(**record, regions=None if regions is None else [Region(**r) for r in regions])
        item.image, item.anomaly_map, item.raw_map, item.mask = (arrays.get(f"{index}.{name}")
                                                                 for name in INSPECTION_ARRAYS)
        items.append(item)
    return items


def pack_outcomes(outcomes: Sequence[Outcome]) -> bytes:
    records: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, tuple):
            records.append({"source": outcome[0], "error": outcome[1]})
            continue
        records.append({"source": outcome.source, "row": outcome.row, "seconds": outcome.seconds,
                        "names": outcome.names, "files": sorted(outcome.files)})
        for folder, content in outcome.files.items():
            arrays[f"{index}.{folder}"] = np.frombuffer(content, np.uint8)
    return pack(records, arrays)


def unpack_outcomes(data: bytes) -> list[Outcome]:
    records, arrays = unpack(data)
    outcomes: list[Outcome] = []
    for index, record in enumerate(records):
        if "error" in record:
            outcomes.append((record["source"], record["error"]))
            continue
        files = {folder: arrays[f"{index}.{folder}"].tobytes() for folder in record["files"]}
        outcomes.append(Rendered(record["source"], record["row"], files, record["seconds"], record["names"]))
    return outcomes
