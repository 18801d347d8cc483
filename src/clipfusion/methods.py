"""Registry of the detectors ``clipfusion evaluate --method`` can run."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipfusion.api import Detector
from clipfusion.baselines import MeanImageDetector
from clipfusion.detector import CLIPFusion
from clipfusion.errors import ClipfusionError
from clipfusion.winclip import WinCLIP

METHODS: dict[str, Callable[..., Detector]] = {
    "clipfusion": CLIPFusion,
    "winclip": WinCLIP,
    "mean-image": MeanImageDetector,
}


def make_detector_factory(name: str, **params: Any) -> Callable[[], Detector]:
    """A zero-argument factory making fresh, unfitted detectors of method ``name``."""
    if name not in METHODS:
        raise ClipfusionError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    constructor = METHODS[name]
    return lambda: constructor(**params)
