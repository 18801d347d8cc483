"""ExportedDetector: the detector protocol over an export folder (``clipfusion export``), without torch.

Per image: resize and normalise for each graph (:func:`normalised_pixels`), run the ``clip``, ``vae`` and
``diffusion`` graphs with OpenVINO Runtime (graphs of batch 1), then fuse the branch maps with the
same NumPy fusion as the torch detector.  Reads either graph format (OpenVINO IR or ONNX).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from clipfusion.config import EXPORT_DTYPES
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError
from clipfusion.hardware import model_precision, precision_note
from clipfusion.images import Images, as_rgb_list
from clipfusion.methods.clipfusion.fusion import BranchMaps, fuse
from clipfusion.notices import say_once
from clipfusion.protocol import Prediction
from clipfusion.resampling import normalised_pixels
from clipfusion.runtime.manifest import ExportManifest, import_openvino, read_manifest
from clipfusion.timing import StageTimer

logger = logging.getLogger(__name__)
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}  # INFERENCE_PRECISION_HINT


class ExportedDetector:
    """A fixed inspection model read from an export folder; ``predict`` as :class:`CLIPFusion`'s.

    device: an OpenVINO device name (``CPU``, ``GPU``, ``AUTO``).  dtype: the inference precision,
    ``auto`` as in PyTorch (``hardware.model_precision``): the precision the model's thresholds were
    derived in where this CPU computes it natively, otherwise float32; a zero-shot export runs in
    bfloat16 on CPUs with native bf16, float32 elsewhere.  threads: inference threads per graph
    (default: OpenVINO's choice, every core).  ``fit`` is refused: refit with ``clipfusion fit`` and
    export again.
    """

    def __init__(self, folder: str | Path, device: str = "CPU", threads: int | None = None,
                 dtype: str = "auto", manifest: ExportManifest | None = None) -> None:
        """``manifest``: the folder's manifest, already read and checked (``inspection.ModelFile``); read
        and checked here when None."""
        if dtype not in EXPORT_DTYPES:
            raise ClipfusionError(f"an export runs in {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
        self.folder = Path(folder)
        self.device, self.threads, self.dtype = device, threads, dtype
        self.manifest: ExportManifest = manifest or read_manifest(self.folder)
        self.preset = self.manifest.preset
        self.category_ = self.manifest.category
        card = self.manifest.card
        if card is not None:
            self.thresholds_: Thresholds = card.thresholds
            self.references_ = card.references
        _, chosen, reason = model_precision("cpu", dtype, None if card is None else card.dtype)
        if reason is not None:
            say_once(logger, *precision_note(f"export {self.folder}", reason, dtype,
                                             "`clipfusion calibrate` its model file here and export that again"))
        ov = import_openvino("an exported model", "runtime")
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[chosen]}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self._graphs = {name: core.compile_model(core.read_model(str(self.folder / file)), device, config)
                        for name, file in self.manifest.graphs.items()}
        # what OpenVINO runs: a CPU without native bf16 computes f32 whatever the hint (or the switch) says
        hint = str(self._graphs["diffusion"].get_property("INFERENCE_PRECISION_HINT"))
        self.precision = "bfloat16" if "bfloat16" in hint else "float32"
        self.timings_ = StageTimer()

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments (the manifest is read again by a copy)."""
        return {"folder": self.folder, "device": self.device, "threads": self.threads, "dtype": self.dtype}

    def describe(self) -> dict[str, Any]:
        """The settings in full, with the precision that runs."""
        return {"export": str(self.folder.resolve()), "preset": self.preset, "overrides": self.manifest.overrides,
                "category": self.category_, "graph_format": self.manifest.graph_format, "dtype": self.precision}

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

    def encode(self, images: Images, category: str | None = None) -> BranchMaps:
        """Every branch map of ``images`` on its own grid, as :meth:`CLIPFusion.encode` gives them
        (``category``: the export's own, which is the default)."""
        if category not in (None, self.category_):
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

    def predict(self, images: Images, category: str | None = None) -> Prediction:
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

