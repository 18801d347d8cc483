"""The detectors ``--method`` can name, and how their constructor arguments are made from settings.

The names themselves live in ``config.METHOD_NAMES`` (torch-free, for the CLI's choices).  A method's
module is imported when its first detector is made: the mean-image baseline then runs without loading
open_clip and diffusers (about 10 s of imports on a 2-core CPU).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.errors import ClipfusionError
from clipfusion.protocol import Detector

# name → (module, class)
METHODS: dict[str, tuple[str, str]] = {
    "clipfusion": ("clipfusion.methods.clipfusion.detector", "CLIPFusion"),
    "winclip": ("clipfusion.methods.winclip", "WinCLIP"),
    "mean-image": ("clipfusion.methods.mean_image", "MeanImageDetector"),
}


def detector_params(method: str, preset: str, overrides: dict[str, Any], runtime: Callable[[], RuntimeConfig],
                    batch_size: int) -> dict[str, Any]:
    """Constructor arguments of ``method``; settings are checked here, before any model loads.
    ``runtime`` is called only for the methods that run models (resolving ``--device auto`` imports torch)."""
    if method not in METHODS:
        raise ClipfusionError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if batch_size < 1:
        raise ClipfusionError("--batch-size must be >= 1")
    if method == "mean-image":
        return {}
    get_preset(preset, **overrides)  # fail early with the setting's name
    params: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "runtime": runtime()}
    if method == "clipfusion":
        params.update(overrides)
    elif overrides:
        raise ClipfusionError(f"{sorted(overrides)} are CLIPFusion settings; {method} does not take them")
    return params


def make_detector_factory(name: str, **params: Any) -> Callable[[], Detector]:
    """A zero-argument factory making fresh, unfitted detectors of method ``name``."""
    if name not in METHODS:
        raise ClipfusionError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    module, class_name = METHODS[name]
    constructor: Callable[..., Detector] = getattr(importlib.import_module(module), class_name)
    return lambda: constructor(**params)
