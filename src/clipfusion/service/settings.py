"""What ``clipfusion serve`` was asked: models, storage, batching, limits and access."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clipfusion.config import RuntimeConfig
from clipfusion.errors import ClipfusionError
from clipfusion.inspection.drift import DriftSettings
from clipfusion.ray_cluster import RayOptions
from clipfusion.runtime.manifest import is_export
from clipfusion.signing import TrustedKeys

logger = logging.getLogger(__name__)

Role = Literal["operator", "admin"]
ROLES: tuple[Role, ...] = ("operator", "admin")


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its name (recorded in the audit table and the log, never the secret) and its role.
    operator: inspect, read the history, give feedback; admin: besides, learn and roll back models."""

    name: str
    role: Role
    secret: str = field(repr=False)


# The largest image the service takes by default: 40 MP (an 8K frame is 33 MP), about 1 GB while it is
# inspected; 10 MP below the default --pixel-budget, so that one such image is still admitted while small
# ones are in flight (at 50 MP, under small-image load, it never was: benchmarks/results/serve_stress.json).
# predict's own default is MAX_PIXELS.
SERVE_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ServiceSettings:
    """models: model files (``*.cfm``), each served under its file name without the suffix.
    data_dir: where the SQLite database (the embedded default) and each inspection's files live.
    database_url: a SQLAlchemy URL (``postgresql+psycopg://...``) instead of the embedded SQLite.
    max_batch / max_wait_ms: dynamic batching; max_batch_pixels: the pixels of one batch (a larger image
    goes alone); max_queue: images waiting per model before 503.  replicas: copies of each model, each
    running batches in its own thread (the CPU's cores shared between them), or with ``ray`` as replicas
    of a Ray Serve deployment on that cluster (``ray_replicas``).
    api_keys: accepted keys with their names and roles (empty: no authentication, everyone acts as admin).
    learn: confirmed false alarms join the model's memory bank.  store_images: a folder to keep each
    uploaded file in (with --learn, uploads are kept in ``data_dir/files/images`` when it is not given);
    keep_days: for so many days.
    trusted_keys: only models signed by one of these keys are served (None: signatures not checked).
    drift: the score-drift monitor of each model's verdicts (``inspection.drift``), reset with each version.
    self_check: at each load (start, learning, rollback) the model's fingerprint is recomputed on its probe
    images: ``refuse`` a model that scores otherwise than when its thresholds were set, ``warn``, or ``off``.
    min_free_mb: /readyz answers 503 ``disk_low`` when data_dir's disk has less free space.
    min_normals: learning re-derives the thresholds only from at least so many confirmed normal images.
    read_timeout: an upload stalled for so many seconds is refused (408); deadline: a request waiting longer
    for its inspections is answered 504 (its images still queued are dropped, finished ones recorded).
    docs: serve the API's documentation (/docs, /openapi.json; behind the key when keys are on).
    publish: receivers of every verdict (``--publish`` URLs: MQTT, webhooks, OPC UA), through outboxes in
    ``data_dir/outbox``.
    pixel_budget: the pixels all requests in flight may decode together (about 10 bytes of memory each);
    at least max_pixels, or the largest image allowed could never be inspected."""

    models: tuple[Path, ...]
    data_dir: Path = Path("clipfusion-serve")
    database_url: str | None = None
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    batch_size: int = 8
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_batch_pixels: int = 8_000_000
    replicas: int = 1
    ray: RayOptions | None = None  # serve --engine ray: the cluster, and what each replica reserves
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = SERVE_MAX_PIXELS
    min_area: int = 16
    api_keys: tuple[ApiKey, ...] = ()
    learn: bool = False
    store_images: Path | None = None
    keep_days: float | None = None  # stored uploads older than this are deleted (None: kept)
    trusted_keys: TrustedKeys | None = None
    self_check: str = "refuse"  # at each load, the fingerprint on the probes: refuse, warn or off
    drift: DriftSettings = field(default_factory=DriftSettings)  # score-drift windows of each model's verdicts
    min_free_mb: int = 500  # /readyz fails below this much free space in data_dir
    pixel_budget: int = 50_000_000  # decoded pixels in flight over all requests (admission.PixelBudget)
    min_normals: int = 10  # operator-confirmed normals needed before learning re-derives the thresholds
    read_timeout: float = 10.0  # seconds without a byte of an upload before it is refused (408)
    deadline: float = 300.0  # seconds a request may wait for its inspections (504)
    docs: bool = False
    publish: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.models:
            raise ClipfusionError("serve needs at least one --model FILE.cfm (write one with `clipfusion fit`)")
        names = [model_name(path) for path in self.models]
        if len(set(names)) != len(names):
            raise ClipfusionError(f"two --model files share a name ({', '.join(names)}); rename one")
        exports = [str(path) for path in self.models if is_export(Path(path))]
        if self.learn and exports:
            raise ClipfusionError(f"--learn adds references to a model file; {', '.join(exports)} is an export, "
                                  "which is fixed: serve its .cfm model file with --learn, or drop --learn")
        if self.learn and self.trusted_keys is not None:
            raise ClipfusionError("--learn writes new model versions that no trusted key has signed, and "
                                  "--trusted-keys serves only signed models: drop one of them")
        if self.pixel_budget < self.max_pixels:
            raise ClipfusionError(f"--pixel-budget ({self.pixel_budget / 1e6:g} MP) must be at least --max-pixels "
                                  f"({self.max_pixels / 1e6:g} MP), or the largest image allowed could never run")
        if self.read_timeout <= 0 or self.deadline <= 0:
            raise ClipfusionError("--read-timeout and --deadline must be positive numbers of seconds")
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0 or self.max_upload_bytes < 1:
            raise ClipfusionError("--max-batch, --max-queue and --max-upload-mb must be >= 1, --max-wait-ms >= 0")
        if self.replicas < 1 or self.max_batch_pixels < 1:
            raise ClipfusionError("--replicas and --max-batch-megapixels must be positive")
        if self.ray is not None and self.ray.workers != self.replicas:
            raise ClipfusionError(f"the Ray cluster is asked for {self.ray.workers} replicas, the service for "
                                  f"{self.replicas}: give --replicas once")

    @property
    def images_dir(self) -> Path | None:
        """Where uploads are kept: --store-images DIR, or with --learn (learning reads them) a folder in
        ``data_dir``; None: not kept."""
        if self.store_images is not None:
            return self.store_images
        return self.data_dir / "files" / "images" if self.learn else None

    @property
    def url(self) -> str:
        """The database URL: the given one, or SQLite in ``data_dir``."""
        return self.database_url or embedded_url(self.data_dir)


def embedded_url(data_dir: Path) -> str:
    """The URL of the embedded SQLite database kept in ``data_dir``."""
    return f"sqlite:///{(data_dir / 'inspections.db').resolve()}"


def model_name(path: Path) -> str:
    """The name a model file is served under: its file name without ``.cfm``."""
    return Path(path).stem


def read_api_keys(path: str | None) -> tuple[ApiKey, ...]:
    """``--api-key-file``: one key per line as ``NAME ROLE KEY`` (ROLE ``operator`` or ``admin``; blank lines
    and ``#`` comments ignored).  A line holding only a key (the format before roles) is an operator key
    named ``line-N``, with a warning.  A missing or empty file, a bad line, or a name or key given twice is
    an error naming the line."""
    if path is None:
        return ()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ClipfusionError(f"cannot read --api-key-file {path}: {exc.strerror}") from None
    keys: list[ApiKey] = []
    unnamed: list[int] = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) == 1:
            unnamed.append(number)
            keys.append(ApiKey(f"line-{number}", "operator", fields[0]))
        elif len(fields) == 3 and fields[1] in ROLES:
            keys.append(ApiKey(fields[0], fields[1], fields[2]))
        else:
            raise ClipfusionError(f"--api-key-file {path} line {number}: write NAME ROLE KEY, ROLE one of "
                                  f"{' or '.join(ROLES)} (e.g. `line-3 operator 6f1c...`)")
    if not keys:
        raise ClipfusionError(f"--api-key-file {path} holds no key (one per line: NAME ROLE KEY)")
    for what, values in (("name", [k.name for k in keys]), ("key", [k.secret for k in keys])):
        if len(set(values)) != len(values):
            raise ClipfusionError(f"--api-key-file {path} gives one {what} twice; each key needs its own name and "
                                  "secret")
    if unnamed:
        logger.warning("--api-key-file %s: lines %s hold a key without a name or role; they are operator keys "
                       "(inspect and give feedback, not learn or roll back); write `NAME operator|admin KEY` per line",
                       path, ", ".join(map(str, unnamed)))
    return tuple(keys)
