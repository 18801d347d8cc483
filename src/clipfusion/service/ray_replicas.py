"""Model replicas on a Ray cluster (``serve --engine ray``): each served model becomes a Ray Serve
deployment of ``--replicas`` replicas (actors anywhere on the cluster, each with its own detector), and
the service process keeps everything else: the API, the batching, the decisions at each image's size,
the files and the database.  Each batch's model pass is one call to the deployment, which Ray Serve
routes to a free replica.

Every call names the model version (its file and SHA-256): a replica loads a version it has not
loaded (a learned one, or a rollback) before it scores with it, and refuses a file whose SHA-256 is
not the one named, so a version change reaches every replica before its next inspection and no replica
scores with a model the service did not check.  The model files must be readable by the replicas at
the same path: one machine, or storage every node mounts.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.config import RuntimeConfig
from clipfusion.errors import ClipfusionError
from clipfusion.images import Images, as_rgb_list
from clipfusion.inspection import ModelFile
from clipfusion.protocol import Prediction
from clipfusion.ray_cluster import RayOptions, connect

logger = logging.getLogger(__name__)
LOADED_VERSIONS = 2  # versions a replica keeps loaded: the served one and the one before (a quick rollback)


class ReplicaScorer:
    """The deployment's replica: scores batches with the model version each call names."""

    def __init__(self, runtime: RuntimeConfig, batch_size: int) -> None:
        self.runtime, self.batch_size = runtime, batch_size
        self.loaded: OrderedDict[str, Any] = OrderedDict()  # SHA-256 → detector, least recently used first

    def _detector(self, path: str, sha256: str) -> Any:
        if sha256 not in self.loaded:
            model = ModelFile.open(path)
            if model.sha256 != sha256:
                raise ClipfusionError(f"model {path} on this node is not the version the service checked (SHA-256 "
                                      f"{model.sha256[:12]}, not {sha256[:12]}): give every node the same file")
            self.loaded[sha256] = model.detector(self.runtime, self.batch_size)
            while len(self.loaded) > LOADED_VERSIONS:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(sha256)
        return self.loaded[sha256]

    def precision(self, path: str, sha256: str) -> str | None:
        """The dtype the replica runs the model in."""
        return getattr(self._detector(path, sha256), "precision", None)

    def predict(self, path: str, sha256: str, images: list[np.ndarray], category: str
                ) -> tuple[np.ndarray, np.ndarray]:
        """(N,) scores and (N, h, w) maps of ``images`` by the model version ``sha256`` at ``path``."""
        prediction = self._detector(path, sha256).predict(images, category)
        return np.asarray(prediction.scores, np.float32), np.asarray(prediction.maps, np.float32)


class RemoteDetector:
    """What the service's :class:`Inspector` holds in place of a detector: each ``predict`` is a call to
    the model's deployment, naming the version to score with."""

    def __init__(self, handle: Any, model: ModelFile, precision: str | None) -> None:
        self.handle, self.model, self.precision = handle, model, precision
        self.category_, self.thresholds_ = model.category, model.thresholds  # the Inspector's decisions

    def predict(self, images: Images, category: str | None = None) -> Prediction:
        arrays = as_rgb_list(images)
        scores, maps = self.handle.predict.remote(str(self.model.path.resolve()), self.model.sha256, arrays,
                                                  category or self.category_).result()
        return Prediction(scores=scores, maps=maps, input_sizes=[image.shape[:2] for image in arrays])

    def fit(self, images: Images, category: str) -> RemoteDetector:
        raise ClipfusionError("a served model learns through the service (--learn), not by fitting its replicas")

    def get_params(self) -> dict[str, Any]:
        return {"handle": self.handle, "model": self.model, "precision": self.precision}


class RayDeployments:
    """The service's deployments on the cluster, one per model, deleted when the service stops."""

    def __init__(self, options: RayOptions, runtime: RuntimeConfig, batch_size: int) -> None:
        """``options``: the cluster (``address``; None starts one on this machine), the replicas of each
        model (``workers``) and what each reserves (``cpus_per_worker``, ``gpus_per_worker``)."""
        connect(options)  # checks the cluster holds every replica of one model
        try:
            from ray import serve
        except ImportError:
            raise ClipfusionError("serve --engine ray needs Ray Serve: pip install 'clipfusion[ray]'") from None

        serve.start(proxy_location="Disabled")  # the service is the only way in: no Ray HTTP proxy
        self.serve, self.options, self.replicas = serve, options, options.workers
        self.runtime, self.batch_size = runtime, batch_size
        self.handles: dict[str, Any] = {}

    def deploy(self, name: str) -> Any:
        """The handle of model ``name``'s deployment, started with the configured replicas."""
        if name not in self.handles:
            deployment = self.serve.deployment(ReplicaScorer, name=f"clipfusion-{name}").options(
                num_replicas=self.replicas, ray_actor_options={"num_cpus": self.options.cpus_per_worker,
                                                               "num_gpus": self.options.gpus_per_worker})
            self.handles[name] = self.serve.run(deployment.bind(self.runtime, self.batch_size),
                                                name=f"clipfusion-{name}", route_prefix=None)
            logger.info("model %s: %d replicas on the Ray cluster", name, self.replicas)
        return self.handles[name]

    def detector(self, name: str, model: ModelFile) -> RemoteDetector:
        """A detector for ``model`` (a version of ``name``) on its deployment's replicas."""
        handle = self.deploy(name)
        precision = handle.precision.remote(str(Path(model.path).resolve()), model.sha256).result()
        return RemoteDetector(handle, model, precision)

    def close(self) -> None:
        for name in self.handles:
            self.serve.delete(f"clipfusion-{name}")
        self.handles.clear()
