"""A served model: its opened model file, one inspector (its own detector) per replica, and what one
inspection writes (files and database rows).  ``score`` (the model pass) runs in a replica's batching
thread; ``finish`` (the decision at the image's own size, its files and row, whose cost grows with the
image) runs in the service's finishing threads, so a large image does not hold up the model."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from clipfusion.errors import ClipfusionError
from clipfusion.inspection import Inspection, Inspector, ModelFile
from clipfusion.inspection.core import Scored
from clipfusion.inspection.drift import ALARM, DriftMonitor
from clipfusion.inspection.selfcheck import self_check
from clipfusion.inspection.sources import Decoded
from clipfusion.inspection.writer import ImageWriter, render
from clipfusion.outputs import write_atomic
from clipfusion.service.ray_replicas import RayDeployments
from clipfusion.service.settings import ServiceSettings
from clipfusion.service.tables import Inspection as InspectionRow
from clipfusion.service.tables import Region
from clipfusion.service.uploads import ItemError, Upload

logger = logging.getLogger(__name__)


# Images up to this size are decided and stored in the model's thread right after their model pass (a
# 256x256 image's take about 20 ms); handing them to other threads cost a quarter of the small-image
# throughput on 2 cores (tiny preset, benchmarks/serve_before_after.py), while a 30-megapixel image's
# take seconds and would stop the model: larger ones are finished outside it.
INLINE_PIXELS = 1_000_000


@dataclass(frozen=True)
class Version:
    """The model version a replica scored an image with: its file and inspector (the image is decided
    and recorded with them, even if learning swaps the model before it is finished)."""

    model: ModelFile
    inspector: Inspector


@dataclass(frozen=True)
class Pending:
    """A large image after its model pass: the version that scored it and its score, to be finished."""

    version: Version
    scored: Scored


ScoredUpload = str | ItemError | Pending  # what the model's batch gives each image (``ServedModel.score``)


class ServedModel:
    """One ``--model`` file, loaded once per replica (``settings.replicas``)."""

    def __init__(self, name: str, model: ModelFile | Path, settings: ServiceSettings, sessions: sessionmaker[Session],
                 observe_model: Callable[[float], None] | None = None, remote: RayDeployments | None = None,
                 publish: Callable[[InspectionRow, str], None] | None = None) -> None:
        """``observe_model(seconds)`` hears each batch's time in the detector alone (for metrics); ``remote``:
        the model's replicas run on a Ray cluster (``serve --engine ray``), not in this process; ``publish``
        hears each committed inspection with the model's category (``serve --publish``)."""
        self.name, self.settings, self.sessions, self.observe_model = name, settings, sessions, observe_model
        self.remote, self.publish = remote, publish
        self.files = ImageWriter(settings.data_dir / "files")
        self.drift_lock = threading.Lock()  # verdicts are finished by several threads
        self.use(model)

    def use(self, model: ModelFile | Path) -> None:
        """Serve ``model`` (opened, or a path) from now on (start-up, learning, rollback) on every replica.
        Call it only while no replica runs a batch (``Batcher.run_exclusive``), so that none sees half of a
        swap."""
        model = model if isinstance(model, ModelFile) else ModelFile.open(model, self.settings.trusted_keys)
        if model.card is None:
            raise ClipfusionError(f"--model {model.path} is an export without thresholds; export a model file "
                                  "(`clipfusion export --model X.cfm`) to serve it")
        if self.remote is not None:  # one inspector: each of the replica threads calls the cluster with it
            remote = Inspector(self.remote.detector(self.name, model), None, model.category, model.sha256,
                               self.settings.min_area, self.settings.max_pixels)
            self.check = self_check(model, remote.detector, self.settings.self_check, remote=True)
            self.model, self.card, self.inspectors = model, model.card, [remote] * self.settings.replicas
            self.drift = self._drift_monitor(model)
            return
        inspectors = [Inspector.from_model(model, self.settings.runtime, self.settings.batch_size,
                                           self.settings.min_area, self.settings.max_pixels)
                      for _ in range(self.settings.replicas)]
        self.check = self_check(model, inspectors[0].detector, self.settings.self_check)  # replicas share weights
        runtime = self.settings.runtime
        # compile (or load the precompiled parts) now, before requests come: the first image would otherwise
        # wait minutes (seconds); the self-check's probes, where they ran, have loaded the precompiled parts
        precompiled = runtime.precompiled != "off" and self.check is None
        if (runtime.compile or precompiled) and not model.is_export:
            logger.info("warming %s's models up (%s) before serving it", self.name,
                        "compiling them" if runtime.compile else "loading the precompiled parts")
            for inspector in inspectors:
                inspector.inspect([np.full((256, 256, 3), 128, np.uint8)])
        if (status := inspectors[0].precompiled_status(model.path)) is not None:
            logger.info("model %s: %s", self.name, status)
        self.model, self.card, self.inspectors = model, model.card, inspectors
        self.drift = self._drift_monitor(model)

    def _drift_monitor(self, model: ModelFile) -> DriftMonitor:
        """A new version's monitor, against the held-out normal scores its fingerprint records (none in a
        model written before fingerprints: insufficient data, said as such)."""
        assert model.card is not None
        return DriftMonitor(model.reference_scores, model.card.thresholds.image, self.settings.drift)

    def observe_drift(self, model: ModelFile, score: float) -> None:
        """A committed verdict of ``model``, counted when it is the version served now."""
        with self.drift_lock:
            if model is not self.model:
                return
            report = self.drift.observe(score)
            state = self.drift.state() if report is not None else None
        if state is not None and state.state == ALARM and state.bad_in_a_row == self.settings.drift.alarm_after:
            logger.warning("model %s: score-drift alarm: %s; check the camera and light, then `clipfusion doctor` "
                           "and `clipfusion calibrate`", self.name, state.detail)

    @property
    def inspector(self) -> Inspector:
        """The first replica's inspector (all replicas serve the same version)."""
        return self.inspectors[0]

    @property
    def path(self) -> Path:
        return self.model.path

    @property
    def sha256(self) -> str:
        return self.model.sha256

    @property
    def category(self) -> str:
        return self.model.category

    @property
    def bank_size(self) -> int:
        bank = getattr(self.inspector.detector, "memory_bank_", None)
        return 0 if bank is None else int(bank.manifest.get("k", 0))

    def score(self, uploads: list[Upload], replica: int) -> list[ScoredUpload]:
        """The model pass over ``uploads`` as one batch, on ``replica``'s detector.  Per image: a small one
        finished here at once (its id, or why it has none), a large one as the version that scored it and
        its score, to be finished (``finish``) outside this thread."""
        version = Version(self.model, self.inspectors[replica])
        scored = version.inspector.score([Decoded(u.filename, u.image) for u in uploads])
        if self.observe_model is not None and scored:
            self.observe_model(scored[0].model_seconds)
        return [self.finish(upload, version, one) if upload.image.shape[0] * upload.image.shape[1] <= INLINE_PIXELS
                else Pending(version, one) for upload, one in zip(uploads, scored, strict=True)]

    def finish(self, upload: Upload, version: Version, scored: Scored) -> str | ItemError:
        """Decide a scored upload at its own size and store its files and row on their own (one transaction,
        its files removed if it fails), so one image that cannot be stored fails alone.  Its new inspection
        id, or why it has none."""
        return self._store(upload, version, version.inspector.decide(scored))

    def _store(self, upload: Upload, version: Version, inspection: Inspection) -> str | ItemError:
        if not inspection.ok:
            return ItemError(upload.filename, 422, "not_finite", f"{upload.filename}: the model's score or map is "
                                                                 "not a finite number")
        identifier = uuid.uuid4().hex
        row: dict[str, Any] | None = None
        stored: Path | None = None
        try:
            row = self.files.write(identifier, render(inspection, version.inspector.decisions, version.model.sha256,
                                                      version.model.signer))
            if self.settings.images_dir is not None:
                stored = self.settings.images_dir / f"{identifier}{_suffix(upload.filename)}"
                write_atomic(stored, upload.data)
            with self.sessions.begin() as session:
                committed = self._row(identifier, upload, version.model, inspection, row, stored)
                session.add(committed)
        except Exception:  # this image's files or row (a full disk, a database refusal): it alone fails
            logger.exception("inspection of %s by %s could not be stored", upload.filename, self.name,
                             extra={"request_id": upload.request_id})
            if row is not None:  # files exist only for committed rows
                self.files.remove(row)
            if stored is not None:
                stored.unlink(missing_ok=True)
            return ItemError(upload.filename, 500, "storage_failed", f"{upload.filename}: its inspection could not "
                                                                     "be stored (the service log says why)")
        if self.publish is not None:  # after the commit: a message never announces an inspection that is not kept
            self.publish(committed, version.model.category)
        if inspection.score is not None:  # always, for a stored inspection
            self.observe_drift(version.model, inspection.score)
        return identifier

    def _row(self, identifier: str, upload: Upload, model: ModelFile, inspection: Inspection, row: dict[str, Any],
             stored: Path | None) -> InspectionRow:
        """The database row of one inspection by ``model`` (``stored``: its upload, kept under
        ``--store-images``)."""
        height, width = upload.image.shape[:2]
        return InspectionRow(
            id=identifier, model=self.name, model_sha256=model.sha256, created=datetime.now(timezone.utc),
            filename=upload.filename, width=width, height=height, score=inspection.score,
            normalised_score=row["normalised_score"], decision=row["decision"], threshold=row["threshold"],
            seconds=round(time.perf_counter() - upload.received, 4), overlay=row["overlay"], mask=row["mask"],
            image=None if stored is None else stored.name, signer=model.signer,
            idempotency_key=upload.idempotency_key,
            regions=[Region(**region) for region in row["regions"] or []])


def _suffix(filename: str) -> str:
    """The file name's suffix as the kept upload's: letters and digits only (a name is not a path)."""
    kept = "".join(c for c in Path(filename).suffix[1:11] if c.isascii() and c.isalnum())
    return f".{kept}" if kept else ""
