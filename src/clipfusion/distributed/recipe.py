"""How a Ray worker builds its detector: the driver may have no GPU, so the runtime travels as asked
(``auto`` included) and each detector resolves it on its worker; a model file is loaded there (once
per actor) and runs in the precision it records where that worker computes it natively."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipfusion.errors import ClipfusionError
from clipfusion.protocol import Detector


@dataclass(frozen=True)
class DetectorRecipe:
    """``model``: a ``.cfm`` file every worker can read at that path; otherwise ``method`` built with
    ``params`` (its constructor arguments, a ``runtime`` among them as asked on the command line)."""

    method: str
    params: dict[str, Any]
    model: str | None = None
    recorded_dtype: str | None = None  # the precision the model file's thresholds were derived in
    sha256: str | None = None  # the model file the driver opened (and verified): a worker refuses another

    def precision(self) -> str | None:
        """The dtype a worker with this machine's hardware runs in (None: a method without models), for
        what the driver records before any worker answers; each row names the dtype its worker ran."""
        runtime = self.params.get("runtime")
        if runtime is None:
            return None
        return str(runtime.resolved(self.recorded_dtype)[0].dtype)

    def build(self) -> Detector:
        from clipfusion.inspection import ModelFile
        from clipfusion.methods.clipfusion.detector import CLIPFusion
        from clipfusion.methods.registry import make_detector_factory

        if self.model is not None:
            model = ModelFile.open(self.model)
            if self.sha256 is not None and model.sha256 != self.sha256:
                raise ClipfusionError(f"model file {self.model} on this worker is not the one the driver opened "
                                      f"({model.sha256[:12]} here, {self.sha256[:12]} there); give every worker "
                                      "the same file")
            return CLIPFusion.load(model.path, self.params.get("runtime"), self.params.get("batch_size", 8),
                                   card=model.card)
        return make_detector_factory(self.method, **self.params)()
