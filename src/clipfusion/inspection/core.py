"""The one path from an image to a verdict, under every front end (``predict``, the service, Ray
workers, the exported runtime): :class:`Inspector` scores a batch with its detector, resizes each map to
its image's own size, applies the thresholds and finds the regions, and gives one :class:`Inspection`
per image, a failed image carrying its error instead of failing the batch."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipfusion.config import RuntimeConfig
from clipfusion.data.base import MAX_PIXELS
from clipfusion.decisions import Region, find_regions, label
from clipfusion.images import ImageLike
from clipfusion.inspection.models import ModelFile
from clipfusion.inspection.sources import Decoded, read_sources
from clipfusion.inspection.thresholds import Decisions, resolve_decisions
from clipfusion.protocol import Detector
from clipfusion.resampling import resize_maps

NO_THRESHOLD = "no threshold"
NOT_FINITE = "score or map not finite (NaN or infinity; check the settings)"


@dataclass
class Inspection:
    """The verdict on one image.

    source: the image's name (absolute path, URI, upload file name, or ``image N``).  score: the image
    score; normalised_score: in [0, 1], 0.5 at the image threshold (None without thresholds); decision:
    ``OK``, ``NG`` or ``no threshold``; threshold: the image threshold that decided.  regions: the
    anomalous regions in the image's own pixels, highest peak first (None without a pixel threshold);
    mask: (H, W) bool, exactly those regions' pixels.  anomaly_map: (H, W) float32 at the image's size;
    raw_map: (h, w) float32 at the detector's output size.  image: the (H, W, 3) uint8 pixels scored.
    precision: the dtype the detector ran in (None for a method without models).  seconds: this image's
    latency so far (reading, the model pass of its batch, the decisions); model_seconds: its batch's
    model pass alone.  error: why it has no verdict (unreadable, not finite), all else None then.
    """

    source: str
    score: float | None = None
    normalised_score: float | None = None
    decision: str | None = None
    threshold: float | None = None
    regions: list[Region] | None = None
    mask: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None
    raw_map: np.ndarray | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    precision: str | None = None
    seconds: float = 0.0
    model_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the image was scored (its decision may still be NG)."""
        return self.error is None


@dataclass(frozen=True)
class Scored:
    """One image after the model pass, before its decision: its score and raw map (h, w) at the detector's
    output size (None for an image that was not readable: ``item.reason`` says why), and the time of its
    batch's model pass."""

    item: Decoded
    score: float | None = None
    raw_map: np.ndarray | None = field(default=None, repr=False)
    model_seconds: float = 0.0


@dataclass(frozen=True)
class InspectionSettings:
    """What every inspection of one run shares, apart from the detector (so that a Ray worker can build
    the same :class:`Inspector` around its own detector): see :class:`Inspector`."""

    decisions: Decisions
    category: str | None = None
    model_id: str | None = None
    min_area: int = 16
    max_pixels: int = MAX_PIXELS
    signer: str | None = None  # the trusted key that signed the model, named in every row

    def inspector(self, detector: Detector) -> Inspector:
        return Inspector(detector, self.decisions, self.category, self.model_id, self.min_area, self.max_pixels)


class Inspector:
    """A detector with its decisions: ``inspect(images) -> [Inspection]``.

    detector: any :class:`clipfusion.protocol.Detector` (a fitted or loaded CLIPFusion, WinCLIP, an
    :class:`ExportedDetector`...).  decisions: the thresholds and colour scale (``from_model`` takes the
    model's own).  category: what the images show (default: the detector's own).  model_id: the model's
    SHA-256, named in every row.  min_area: the smallest region kept, in the image's pixels.  max_pixels:
    larger images are refused per image, before decoding.

    Example::

        inspector = Inspector.from_model("bottle.cfm")
        for inspection in inspector.inspect(["part1.png", "part2.png"]):
            print(inspection.source, inspection.decision, inspection.regions)
    """

    def __init__(self, detector: Detector, decisions: Decisions | None = None, category: str | None = None,
                 model_id: str | None = None, min_area: int = 16, max_pixels: int = MAX_PIXELS) -> None:
        self.detector = detector
        thresholds = getattr(detector, "thresholds_", None)
        self.decisions = decisions or resolve_decisions(None, None, thresholds, detector, category, None)
        self.category = category or getattr(detector, "category_", None)
        self.model_id, self.min_area, self.max_pixels = model_id, min_area, max_pixels

    @classmethod
    def from_model(cls, model: str | Path | ModelFile, runtime: RuntimeConfig | None = None, batch_size: int = 8,
                   min_area: int = 16, max_pixels: int = MAX_PIXELS) -> Inspector:
        """An inspector of a model file or export folder, with its own thresholds and identity."""
        opened = model if isinstance(model, ModelFile) else ModelFile.open(model)
        detector = opened.detector(runtime, batch_size)
        return cls(detector, None, opened.category, opened.sha256, min_area, max_pixels)

    @property
    def precision(self) -> str | None:
        """The dtype the detector runs in (None for a method without models)."""
        return getattr(self.detector, "precision", None)

    def precompiled_status(self, model: str | Path) -> str | None:
        """One line on the detector's precompiled parts looked up so far (``RuntimeConfig.precompiled``):
        which run compiled, which eager and how ``model``'s get built; None for a detector without them."""
        parts = getattr(self.detector, "precompiled_parts", lambda: None)()
        return None if parts is None else parts.status(str(model))

    def inspect(self, images: Sequence[ImageLike]) -> list[Inspection]:
        """One :class:`Inspection` per image (paths, URIs, Pillow images or arrays), in order; an
        unreadable or too large image gets its error, the others their verdicts."""
        return self.inspect_decoded(read_sources(images, self.max_pixels))

    def inspect_decoded(self, decoded: Sequence[Decoded]) -> list[Inspection]:
        """:meth:`inspect` of images already read: the readable ones in one model pass."""
        return [self.decide(scored) for scored in self.score(decoded)]

    def score(self, decoded: Sequence[Decoded]) -> list[Scored]:
        """The model pass alone, over the readable images at once: one :class:`Scored` per image, in order.
        Its cost hardly depends on the images' sizes; :meth:`decide` (at each image's own size) does, and
        may run elsewhere (the service decides in other threads while the model scores the next batch)."""
        readable = [(item, item.image) for item in decoded if item.image is not None]
        scores: dict[int, Scored] = {}
        if readable:
            start = time.perf_counter()
            prediction = self.detector.predict([image for _, image in readable], self.category)
            model_seconds = time.perf_counter() - start
            for (item, _), score, raw_map in zip(readable, prediction.scores, prediction.maps, strict=True):
                scores[id(item)] = Scored(item, float(score), raw_map, model_seconds)
        return [scores.get(id(item)) or Scored(item) for item in decoded]

    def decide(self, scored: Scored) -> Inspection:
        """One scored image's verdict: its map at its own size, the decision, the regions and their mask
        (or the reason it has none)."""
        item, image, score, raw_map, model_seconds = (scored.item, scored.item.image, scored.score, scored.raw_map,
                                                      scored.model_seconds)
        if image is None or score is None or raw_map is None:
            return Inspection(item.source, seconds=item.seconds, error=item.reason)
        start = time.perf_counter()
        seconds = item.seconds + model_seconds
        if not (math.isfinite(score) and np.isfinite(raw_map).all()):
            return Inspection(item.source, seconds=seconds, model_seconds=model_seconds, error=NOT_FINITE)
        decisions = self.decisions
        raw_map = raw_map.astype(np.float32)
        anomaly_map = resize_maps(raw_map[None], image.shape[:2])[0]
        mask, regions = (None, None) if decisions.pixel is None else \
            find_regions(anomaly_map, decisions.pixel, self.min_area)
        normalised = None if decisions.normal is None else float(decisions.normal.normalised(np.array([score]))[0])
        return Inspection(
            item.source, score=score, normalised_score=normalised,
            decision=NO_THRESHOLD if decisions.image is None else label(score, decisions.image),
            threshold=decisions.image, regions=regions, mask=mask, anomaly_map=anomaly_map, raw_map=raw_map,
            image=image, precision=self.precision,
            seconds=seconds + time.perf_counter() - start, model_seconds=model_seconds)
