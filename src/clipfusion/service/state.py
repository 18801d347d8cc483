"""What one running service holds: settings, database, served models, their batchers, metrics."""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from clipfusion.inspection import ModelFile
from clipfusion.inspection.drift_metrics import DriftCollector
from clipfusion.inspection.writer import FILE_SUFFIXES
from clipfusion.publishing.sinks import open_outboxes
from clipfusion.runtime.manifest import is_export
from clipfusion.service import learning
from clipfusion.service.admission import PixelBudget
from clipfusion.service.batching import Batcher
from clipfusion.service.database import make_engine, migrate, session_factory
from clipfusion.service.errors import ServiceError
from clipfusion.service.inspector import ScoredUpload, ServedModel
from clipfusion.service.learning import active_version
from clipfusion.service.metrics import ServiceMetrics
from clipfusion.service.publisher import Publisher
from clipfusion.service.ray_replicas import RayDeployments
from clipfusion.service.schemas import ChangeOut
from clipfusion.service.settings import ServiceSettings, model_name
from clipfusion.service.tables import Inspection, ModelVersion
from clipfusion.service.uploads import Upload

logger = logging.getLogger(__name__)
FINISHERS = 2  # threads deciding, rendering and storing scored images, beside the model threads


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    models: dict[str, ServedModel] = field(default_factory=dict)
    batchers: dict[str, Batcher[Upload, ScoredUpload]] = field(default_factory=dict)
    opened: bool = False  # open() has run (or is running)
    ready: bool = False
    draining: bool = False  # stopping: new requests are answered 503 shutting_down (server.DrainingServer)
    in_flight: int = 0  # requests being handled (not counting the probes and the drain's refusals)
    last_arrival: float = 0.0  # time.monotonic() of the latest request (not counting the probes)
    engine: Engine | None = None
    sessions: sessionmaker[Session] | None = None
    pixels: PixelBudget = field(init=False)
    finishers: ThreadPoolExecutor = field(init=False)  # decide, render and store each scored image
    remote: RayDeployments | None = None  # serve --engine ray: the models' replicas on the cluster
    publisher: Publisher = field(default_factory=lambda: Publisher(()))  # serve --publish

    def __post_init__(self) -> None:
        self.pixels = PixelBudget(self.settings.pixel_budget)
        self.finishers = ThreadPoolExecutor(max_workers=FINISHERS, thread_name_prefix="finish")

    def open(self) -> None:
        """Database first (migrated), then every model: a bad model file stops the start-up, not a request.
        Once: ``serve`` opens before uvicorn starts, an app run otherwise (a test client) at its start-up."""
        if self.opened:
            return
        self.opened = True
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.watch_disk()
        self.engine = make_engine(self.settings.url)
        migrate(self.engine)
        self.sessions = session_factory(self.engine)
        self.publisher = Publisher(open_outboxes(self.settings.publish, self.settings.data_dir / "outbox",
                                                 "clipfusion-serve"))
        if self.settings.ray is not None:
            self.remote = RayDeployments(self.settings.ray, self.settings.runtime, self.settings.batch_size)
        else:
            share_cores(self.settings)
        for path in self.settings.models:
            name = model_name(path)
            opened = ModelFile.open(path, self.settings.trusted_keys)
            model = ServedModel(name, self._version_to_serve(name, opened), self.settings, self.sessions,
                                self.metrics.model_seconds.labels(name).observe, self.remote,
                                self.publisher.publish if self.publisher.outboxes else None)
            self.models[name] = model
            logger.info("serving %s (%s, %s) from %s", name, model.category, model.model.preset, model.path)
        self.metrics.registry.register(DriftCollector(lambda: {name: m.drift for name, m in self.models.items()}))
        self.publisher.recover(self.sessions, {name: model.category for name, model in self.models.items()})
        self.publisher.start()
        self.metrics.watch_outboxes(self.publisher.outboxes)

    def watch_disk(self) -> None:
        """/metrics reports the data folder's free space, read at each scrape."""
        folder = self.settings.data_dir
        self.metrics.disk_free.set_function(lambda: float(shutil.disk_usage(folder).free))

    def start_batchers(self) -> None:
        for name, model in self.models.items():
            def observe(size: int, seconds: float, replica: int, name: str = name) -> None:
                self.metrics.batch_size.labels(name).observe(size)
                self.metrics.batch_seconds.labels(name).observe(seconds)
                self.metrics.replica_batches.labels(name, str(replica)).inc()

            batcher: Batcher[Upload, ScoredUpload] = Batcher(
                name, model.score, self.settings.max_batch, self.settings.max_wait_ms, self.settings.max_queue, observe,
                replicas=self.settings.replicas, weigh=_pixels, max_weight=self.settings.max_batch_pixels)
            batcher.start()
            self.batchers[name] = batcher
            self.metrics.queue_depth.labels(name).set_function(_depth_of(batcher))
        self.ready = True

    def prune_images(self) -> int:
        """With ``keep_days``: delete the files of inspections older than that (their overlay, mask, raw map
        and thumbnail, and their stored upload); the inspection rows stay, their file fields emptied.  How
        many inspections were pruned."""
        if self.settings.keep_days is None or self.sessions is None:
            return 0
        cutoff = datetime.now(timezone.utc) - timedelta(days=self.settings.keep_days)
        files, uploads = self.settings.data_dir / "files", self.settings.images_dir
        with self.sessions.begin() as session:
            old = session.scalars(select(Inspection).where(Inspection.created < cutoff, (Inspection.overlay != "")
                                                           | Inspection.image.is_not(None))).all()
            for inspection in old:
                for folder, suffix in FILE_SUFFIXES.items():
                    (files / folder / f"{inspection.id}{suffix}").unlink(missing_ok=True)
                if uploads is not None and inspection.image:
                    (uploads / inspection.image).unlink(missing_ok=True)
                inspection.overlay, inspection.mask, inspection.image = "", None, None
        if old:
            logger.info("deleted the files of %d inspections older than %g days", len(old), self.settings.keep_days)
        return len(old)

    async def close(self) -> None:
        """Stop accepting, finish what is queued (every finished inspection is recorded), then close."""
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.close()
        self.finishers.shutdown(wait=True)  # every scored image is recorded before the database closes
        self.publisher.close()  # what the receivers take in a few seconds; the rest waits in the outboxes
        if self.remote is not None:
            self.remote.close()
        if self.engine is not None:
            self.engine.dispose()

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ServiceError(404, "unknown_model", f"no model {name!r}; served: {', '.join(self.models)}")
        return self.models[name]

    def _version_to_serve(self, name: str, given: ModelFile) -> ModelFile | Path:
        """The model to serve for ``--model given``: with --learn, the newest version learned from it
        (when it still exists); otherwise ``given``, recorded as the active version."""
        assert self.sessions is not None
        sha = given.sha256
        with self.sessions.begin() as session:
            active = active_version(session, name)
            if active is not None and active.sha256 == sha:
                return given
            if (active is not None and self.settings.learn and Path(active.path).is_file()
                    and _descends_from(session, active, sha)):
                logger.info("serving %s's learned version %d (learned from %s)", name, active.id, given)
                return Path(active.path)
            if active is not None:
                active.active = False
            session.add(ModelVersion(name=name, path=str(given.path.resolve()), sha256=sha,
                                     created=datetime.now(timezone.utc), active=True))
        return given

    async def learn(self, name: str, inspection_id: str, actor: str) -> ChangeOut:
        """Learn from a confirmed false alarm, in the model's thread (between batches); ``actor``: the acting
        key's name for the audit table ("" with no keys)."""
        def task() -> ChangeOut:
            assert self.sessions is not None
            with self.sessions.begin() as session:
                inspection = session.get(Inspection, inspection_id)
                assert inspection is not None
                return learning.learn(session, self.models[name], inspection, actor)

        return await self.batchers[name].run_exclusive(task)

    async def rollback(self, name: str, actor: str) -> ChangeOut:
        model = self.model(name)

        def task() -> ChangeOut:
            assert self.sessions is not None
            with self.sessions.begin() as session:
                return learning.rollback(session, model, actor)

        return await self.batchers[name].run_exclusive(task)


def _pixels(upload: Upload) -> int:
    return int(upload.image.shape[0] * upload.image.shape[1])


def share_cores(settings: ServiceSettings) -> None:
    """With several replicas, each runs its batches on its share of the CPU's cores (torch's threads),
    instead of every replica starting a thread per core; an export's runtime shares them itself."""
    if settings.replicas == 1 or all(is_export(Path(path)) for path in settings.models):
        return
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // settings.replicas))
    logger.info("%d replicas per model, %d of the %d cores each", settings.replicas, torch.get_num_threads(), cores)


def _depth_of(batcher: Batcher[Upload, ScoredUpload]) -> Callable[[], float]:
    def depth() -> float:
        return float(batcher.depth)
    return depth


def _descends_from(session: Session, version: ModelVersion, sha256: str) -> bool:
    """Whether ``version`` was learned (over any number of steps) from the file with ``sha256``."""
    current: ModelVersion | None = version
    while current is not None:
        if current.sha256 == sha256:
            return True
        current = None if current.parent_id is None else session.get(ModelVersion, current.parent_id)
    return False
