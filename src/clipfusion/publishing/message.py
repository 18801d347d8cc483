"""The message of one inspection, the same for every sink: ``clipfusion.inspection/1``.

Fields: ``schema``; ``id`` (the inspection's id, the receivers' idempotency key: a message delivered
twice carries the same id); ``model`` (its SHA-256) and ``category``; ``source`` (the image's path or
name); ``time`` (UTC, ISO 8601); ``decision`` (OK/NG), ``score``, ``normalised_score`` (0.5 at the
threshold), ``threshold``; ``regions`` (``x, y, width, height, area, peak`` in the image's pixels);
``width`` and ``height`` (the image's); from a video, ``frame`` and ``frame_time``.
"""
from __future__ import annotations

import json
from typing import Any

SCHEMA = "clipfusion.inspection/1"


def inspection_message(identifier: str, row: dict[str, Any], category: str | None) -> dict[str, Any]:
    """The message of a results row (as ``predict`` and ``watch`` write them)."""
    regions = row.get("regions")
    if isinstance(regions, str):  # rows keep regions as JSON text
        regions = json.loads(regions or "[]")
    message = {"schema": SCHEMA, "id": identifier, "model": row.get("model_id"), "category": category,
               "source": row["path"], "time": row.get("timestamp"), "decision": row.get("decision"),
               "score": row.get("score"), "normalised_score": row.get("normalised_score"),
               "threshold": row.get("threshold"), "regions": regions or []}
    if "frame" in row:
        message.update(frame=row["frame"], frame_time=row.get("frame_time"))
    if "width" in row:
        message.update(width=row["width"], height=row["height"])
    return message
