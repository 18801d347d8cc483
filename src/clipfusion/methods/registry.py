"""The detectors ``--method`` can name, and how their constructor arguments are made from settings.

The names themselves live in ``config.METHOD_NAMES`` (torch-free, for the CLI's choices); importing
this module imports the methods, hence torch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.errors import ClipfusionError
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.mean_image import MeanImageDetector
from clipfusion.methods.winclip import WinCLIP
from clipfusion.protocol import Detector

METHODS: dict[str, Callable[..., Detector]] = {
    "clipfusion": CLIPFusion,
    "winclip": WinCLIP,
    "mean-image": MeanImageDetector,
}


def detector_params(method: str, preset: str, overrides: dict[str, Any], runtime: RuntimeConfig,
                    batch_size: int) -> dict[str, Any]:
    """Constructor arguments of ``method``; settings are checked here, before any model loads."""
    if method not in METHODS:
        raise ClipfusionError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if batch_size < 1:
        raise ClipfusionError("--batch-size must be >= 1")
    if method == "mean-image":
        return {}
    get_preset(preset, **overrides)  # fail early with the setting's name
    params: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "runtime": runtime}
    if method == "clipfusion":
        params.update(overrides)
    elif overrides:
        raise ClipfusionError(f"{sorted(overrides)} are CLIPFusion settings; {method} does not take them")
    return params


def make_detector_factory(name: str, **params: Any) -> Callable[[], Detector]:
    """A zero-argument factory making fresh, unfitted detectors of method ``name``."""
    if name not in METHODS:
        raise ClipfusionError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    constructor = METHODS[name]
    return lambda: constructor(**params)
