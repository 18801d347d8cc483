"""ExportedDetector: the detector protocol over an export folder (``clipfusion export``), without torch.

Per image: resize and normalise for each graph (:func:`normalised_pixels`), run the ``clip``, ``vae`` and
``diffusion`` graphs with OpenVINO Runtime (graphs of batch 1), then fuse the branch maps with the
same NumPy fusion as the torch detector.  Reads either graph format (OpenVINO IR or ONNX).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError
from clipfusion.export.bundle import ExportManifest, import_openvino, read_manifest
from clipfusion.images import Images, as_rgb_list
from clipfusion.methods.clipfusion.fusion import BranchMaps, fuse
from clipfusion.protocol import Prediction
from clipfusion.resampling import normalised_pixels
from clipfusion.timing import StageTimer


class ExportedDetector:
    """A fixed inspection model read from an export folder; ``predict`` as :class:`CLIPFusion`'s.

    device: an OpenVINO device name (``CPU``, ``GPU``, ``AUTO``).  threads: inference threads per
    graph (default: OpenVINO's choice, every core).  ``fit`` is refused: refit with ``clipfusion fit``
    and export again.
    """

    def __init__(self, folder: str | Path, device: str = "CPU", threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest: ExportManifest = read_manifest(self.folder)
        self.preset = self.manifest.preset
        self.category_ = self.manifest.category
        if self.manifest.card is not None:
            self.thresholds_: Thresholds = self.manifest.card.thresholds
            self.references_ = self.manifest.card.references
        ov = import_openvino("an exported model", "runtime")
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # the maps of PyTorch float32, on every CPU
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self._graphs = {name: core.compile_model(core.read_model(str(self.folder / file)), device, config)
                        for name, file in self.manifest.graphs.items()}
        self.timings_ = StageTimer()

    def get_params(self) -> dict[str, Any]:
        return {"export": str(self.folder.resolve()), "preset": self.preset, "overrides": self.manifest.overrides,
                "category": self.category_, "graph_format": self.manifest.graph_format}

    def fit(self, images: Images, category: str) -> ExportedDetector:
        raise ClipfusionError(f"{self.folder} is an exported model and cannot learn; fit with `clipfusion fit --out "
                              "X.cfm` and export that again")

    def _pixels(self, graph: str, image: np.ndarray) -> np.ndarray:
        spec = self.manifest.inputs[graph]
        return normalised_pixels([image], tuple(spec["size"]), tuple(spec["mean"]), tuple(spec["std"]))

    def _run(self, graph: str, pixels: np.ndarray) -> list[np.ndarray]:
        with self.timings_(graph):
            result = self._graphs[graph](pixels)
        return [np.asarray(result[index], dtype=np.float32) for index in range(len(self.manifest.outputs[graph]))]

    def encode(self, images: Images, category: str) -> BranchMaps:
        """Every branch map of ``images`` on its own grid, as :meth:`CLIPFusion.encode` gives them."""
        if category != self.category_:
            raise ClipfusionError(f"{self.folder} was exported for {self.category_!r}, not {category!r}")
        parts = []
        for image in as_rgb_list(images):
            clip = dict(zip(self.manifest.outputs["clip"], self._run("clip", self._pixels("clip", image)),
                            strict=True))
            (latents,) = self._run("vae", self._pixels("vae", image))
            diffusion = dict(zip(self.manifest.outputs["diffusion"], self._run("diffusion", latents), strict=True))
            parts.append(BranchMaps(clip["clip_score"], clip["clip_language"], diffusion["diff_language"],
                                    clip.get("clip_visual"), diffusion.get("diff_visual")))
        return BranchMaps.concat(parts)

    def predict(self, images: Images, category: str) -> Prediction:
        """Scores (N,) and maps (N, S, S), with the model's thresholds; see :meth:`CLIPFusion.predict`."""
        images = as_rgb_list(images)
        if len(images) == 0:
            raise ClipfusionError("predict needs at least one image")
        maps = self.encode(images, category)
        with self.timings_("fusion"):
            prediction = fuse(maps, self.manifest.fusion)
        prediction.input_sizes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
        thresholds = getattr(self, "thresholds_", None)
        if thresholds is not None:
            prediction.image_threshold, prediction.pixel_threshold = thresholds.image, thresholds.pixel
        return prediction

