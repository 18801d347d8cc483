"""How a Ray worker builds its detector: the driver may have no GPU, so ``auto`` device and dtype are
resolved on the worker, and a model file is loaded there (once per actor)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clipfusion.config import RuntimeConfig
from clipfusion.protocol import Detector


@dataclass(frozen=True)
class DetectorRecipe:
    """``model``: a ``.cfm`` file every worker can read at that path; otherwise ``method`` built with
    ``params`` (its constructor arguments; a ``runtime`` among them gets the worker's device and dtype).
    ``device``/``dtype``: as asked on the command line, ``auto`` included."""

    method: str
    params: dict[str, Any]
    device: str = "auto"
    dtype: str = "auto"
    model: str | None = None

    def runtime(self, base: RuntimeConfig | None) -> RuntimeConfig:
        """``base`` (or the defaults) on this worker's device and dtype."""
        from clipfusion.hardware import auto_device_dtype

        device, dtype = auto_device_dtype(self.device, self.dtype)
        return dataclasses.replace(base or RuntimeConfig(), device=device, dtype=dtype)

    def build(self) -> Detector:
        from clipfusion.methods.clipfusion.detector import CLIPFusion
        from clipfusion.methods.registry import make_detector_factory

        if self.model is not None:
            return CLIPFusion.load(self.model, self.runtime(self.params.get("runtime")),
                                   self.params.get("batch_size", 8))
        params = dict(self.params)
        if "runtime" in params:
            params["runtime"] = self.runtime(params["runtime"])
        return make_detector_factory(self.method, **params)()
