"""Connecting to Ray and checking that the cluster can hold what a run asks for (Ray would otherwise
wait forever for a GPU that no node has)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType

from clipfusion.errors import ClipfusionError
from clipfusion.hardware import NATIVE_BF16_SWITCH

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """``address``: None starts a local Ray instance on this machine, ``auto`` joins the cluster this
    machine belongs to, ``ray://host:10001`` a remote one.  ``workers``: scoring actors (predict) or
    units running at once (evaluate), each with ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ClipfusionError(f"--workers must be >= 1, not {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ClipfusionError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")


def import_ray(local: bool = False) -> ModuleType:
    """Ray; ``local``: a Ray instance started by this process listens on 127.0.0.1 only (Ray's setting for
    single-machine use, read when Ray is first imported), never on the machine's network address."""
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ClipfusionError("--engine ray needs Ray: pip install 'clipfusion[ray]'") from None
    return ray


def connect(options: RayOptions, spare_cpus: float = 0.0) -> ModuleType:
    """Ray, initialised once per process; the cluster checked to hold all ``workers`` at once plus
    ``spare_cpus`` (for tasks that feed them: without those CPUs the run would wait forever)."""
    ray = import_ray(local=options.address is None)
    if not ray.is_initialized():
        # the precision switch set here decides on every worker too: one run, one precision policy
        switch = os.environ.get(NATIVE_BF16_SWITCH)
        runtime_env = {"env_vars": {NATIVE_BF16_SWITCH: switch}} if switch is not None else None
        try:
            if options.address is None:
                ray.init(include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)
            else:
                ray.init(address=options.address, logging_level=logging.WARNING, runtime_env=runtime_env)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = options.address or "a local instance"
            raise ClipfusionError(f"--ray-address {where}: cannot connect to Ray ({exc}); start a cluster with "
                                  "`ray start --head` or leave --ray-address out for a local one") from None
    available = ray.cluster_resources()
    for name, wanted in (("GPU", options.workers * options.gpus_per_worker),
                         ("CPU", options.workers * options.cpus_per_worker + spare_cpus)):
        if wanted > available.get(name, 0.0):
            spare = f" + {spare_cpus:g} for decoding and rendering" if name == "CPU" and spare_cpus else ""
            raise ClipfusionError(
                f"--workers {options.workers} × --{name.lower()}s-per-worker{spare} needs {wanted:g} {name}s but the "
                f"Ray cluster has {available.get(name, 0.0):g}; lower them, or add nodes")
    logger.info("Ray cluster: %g CPUs, %g GPUs", available.get("CPU", 0.0), available.get("GPU", 0.0))
    return ray
