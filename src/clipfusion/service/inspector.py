"""A served model: its detector, its decisions, and what one inspection writes (files and database
rows).  ``inspect`` runs in the model's own batching thread."""
from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from clipfusion.errors import ClipfusionError
from clipfusion.export.bundle import is_export, model_sha256
from clipfusion.methods.clipfusion.model_file import read_card
from clipfusion.outputs import write_atomic
from clipfusion.runtime.exported import ExportedDetector
from clipfusion.service.settings import ServiceSettings
from clipfusion.service.tables import Inspection, Region
from clipfusion.tasks.predict import ImageWriter, RowSettings
from clipfusion.tasks.thresholds import resolve_decisions

if TYPE_CHECKING:
    from clipfusion.methods.clipfusion.detector import CLIPFusion

logger = logging.getLogger(__name__)


@dataclass
class Upload:
    """A decoded uploaded image: (H, W, 3) uint8, its file name and bytes, and when it arrived."""

    filename: str
    image: np.ndarray
    data: bytes
    received: float  # time.perf_counter() when its request was read


class NotFiniteError(ValueError):
    """The model gave this image a score or map that is not a finite number."""


class ServedModel:
    """One ``--model`` file, loaded once."""

    def __init__(self, name: str, path: Path, settings: ServiceSettings, sessions: sessionmaker[Session],
                 observe_model: Callable[[float], None] | None = None) -> None:
        """``observe_model(seconds)`` hears each batch's time in the detector alone (for metrics)."""
        self.name, self.settings, self.sessions, self.observe_model = name, settings, sessions, observe_model
        self.files = settings.data_dir / "files"
        self.use(path)

    def use(self, path: Path) -> None:
        """Serve the model file at ``path`` from now on (start-up, learning, rollback).  Call it from
        the model's own thread only, so that no batch sees half of a swap."""
        self.path = Path(path)
        self.detector: CLIPFusion | ExportedDetector
        if is_export(self.path):  # run by OpenVINO Runtime: this path imports no torch
            self.detector = ExportedDetector(self.path, dtype=self.settings.runtime.dtype)
            if self.detector.manifest.card is None:
                raise ClipfusionError(f"--model {self.path} is an export without thresholds; export a model file "
                                      "(`clipfusion export --model X.cfm`) to serve it")
            self.card = self.detector.manifest.card
        else:
            from clipfusion.methods.clipfusion.detector import CLIPFusion

            self.card = read_card(self.path)
            self.detector = CLIPFusion.load(self.path, self.settings.runtime, self.settings.batch_size)
            if self.settings.runtime.compile:
                # compile now, before requests come: the first image would otherwise wait minutes
                logger.info("compiling %s's models (--compile) before serving it", self.name)
                self.detector.predict([np.full((256, 256, 3), 128, np.uint8)], self.detector.category_)
        self.sha256 = model_sha256(self.path)
        self.category: str = self.detector.category_
        self.decisions = resolve_decisions(None, None, self.detector.thresholds_, self.detector, self.category, None)
        self.writer = ImageWriter(self.files, RowSettings(self.category, self.decisions, self.sha256,
                                                          self.settings.min_area, self.settings.max_pixels))

    @property
    def bank_size(self) -> int:
        bank = getattr(self.detector, "memory_bank_", None)
        return 0 if bank is None else int(bank.manifest.get("k", 0))

    def inspect(self, uploads: list[Upload]) -> list[str | NotFiniteError]:
        """Score ``uploads`` as one batch, write each one's files and rows in one transaction; the new
        inspection ids (or, per image, why it could not be scored)."""
        start = time.perf_counter()
        prediction = self.detector.predict([upload.image for upload in uploads], self.category)
        if self.observe_model is not None:
            self.observe_model(time.perf_counter() - start)
        outcomes: list[str | NotFiniteError] = []
        with self.sessions.begin() as session:
            for upload, score, raw_map, full_map in zip(uploads, prediction.scores, prediction.maps,
                                                        prediction.maps_at_input_size(), strict=True):
                if not (math.isfinite(float(score)) and np.isfinite(raw_map).all()):
                    outcomes.append(NotFiniteError(f"{upload.filename}: the model's score or map is not a finite "
                                                   "number"))
                    continue
                identifier = uuid.uuid4().hex
                row = self.writer.row(identifier, Path(upload.filename), upload.image, float(score), raw_map, full_map)
                stored = None
                if self.settings.images_dir is not None:  # the name only: the folder is the settings'
                    stored = f"{identifier}{Path(upload.filename).suffix[:10]}"
                    write_atomic(self.settings.images_dir / stored, upload.data)
                height, width = upload.image.shape[:2]
                session.add(Inspection(
                    id=identifier, model=self.name, model_sha256=self.sha256, created=datetime.now(timezone.utc),
                    filename=upload.filename, width=width, height=height, score=float(score),
                    normalised_score=row["normalised_score"], decision=row["decision"], threshold=row["threshold"],
                    seconds=round(time.perf_counter() - upload.received, 4), overlay=row["overlay"],
                    mask=row["mask"], image=stored,
                    regions=[Region(**region) for region in row["regions"] or []]))
                outcomes.append(identifier)
        return outcomes
