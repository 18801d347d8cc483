"""What one running service holds: settings, database, served models, their batchers, metrics."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from clipfusion.service.batching import Batcher
from clipfusion.service.database import make_engine, migrate, session_factory
from clipfusion.service.errors import ServiceError
from clipfusion.service.inspector import ServedModel, Upload
from clipfusion.service.metrics import ServiceMetrics
from clipfusion.service.settings import ServiceSettings
from clipfusion.service.tables import ModelVersion

logger = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    models: dict[str, ServedModel] = field(default_factory=dict)
    batchers: dict[str, Batcher[Upload, object]] = field(default_factory=dict)
    ready: bool = False
    engine: Engine | None = None
    sessions: sessionmaker[Session] | None = None

    def open(self) -> None:
        """Database first (migrated), then every model: a bad model file stops the start-up, not a request."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.settings.url)
        migrate(self.engine)
        self.sessions = session_factory(self.engine)
        for path in self.settings.models:
            model = ServedModel(path, self.settings, self.sessions)
            self.models[model.name] = model
            self._record_version(model)
            logger.info("serving %s (%s, %s) from %s", model.name, model.category, model.detector.preset, path)

    def start_batchers(self) -> None:
        for name, model in self.models.items():
            def observe(size: int, seconds: float, name: str = name) -> None:
                self.metrics.batch_size.labels(name).observe(size)
                self.metrics.batch_seconds.labels(name).observe(seconds)

            batcher: Batcher[Upload, object] = Batcher(name, model.inspect, self.settings.max_batch,
                                                       self.settings.max_wait_ms, self.settings.max_queue, observe)
            batcher.start()
            self.batchers[name] = batcher
            self.metrics.queue_depth.labels(name).set_function(_depth_of(batcher))
        self.ready = True

    async def close(self) -> None:
        """Stop accepting, finish what is queued (every finished inspection is recorded), then close."""
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.close()
        if self.engine is not None:
            self.engine.dispose()

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ServiceError(404, "unknown_model", f"no model {name!r}; served: {', '.join(self.models)}")
        return self.models[name]

    def _record_version(self, model: ServedModel) -> None:
        assert self.sessions is not None
        with self.sessions.begin() as session:
            active = session.scalars(select(ModelVersion).where(ModelVersion.name == model.name,
                                                                ModelVersion.active)).first()
            if active is not None and active.sha256 == model.sha256:
                return
            if active is not None:
                active.active = False
            session.add(ModelVersion(name=model.name, path=str(model.path.resolve()), sha256=model.sha256,
                                     created=datetime.now(timezone.utc), active=True))


def _depth_of(batcher: Batcher[Upload, object]) -> Callable[[], float]:
    def depth() -> float:
        return float(batcher.depth)
    return depth
