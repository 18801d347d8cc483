"""clipfusion: zero- and few-shot anomaly detection with CLIP and Stable Diffusion.

The public API, imported on first use so that ``clipfusion --help`` does not load torch:
``CLIPFusion``, ``WinCLIP``, ``Prediction``, ``get_preset``, ``RuntimeConfig``, ``load_dataset``,
``EvaluationConfig``, ``EvaluationRunner``, ``ExportedDetector`` (an export, without torch), and the
inspection core every front end uses: ``Inspector``, ``Inspection``, ``ModelFile``, ``Thresholds``,
``Region``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "CLIPFusion": "clipfusion.methods.clipfusion.detector",
    "WinCLIP": "clipfusion.methods.winclip",
    "Prediction": "clipfusion.protocol",
    "get_preset": "clipfusion.config",
    "RuntimeConfig": "clipfusion.config",
    "Thresholds": "clipfusion.decisions",
    "Region": "clipfusion.decisions",
    "Inspector": "clipfusion.inspection",
    "Inspection": "clipfusion.inspection",
    "ModelFile": "clipfusion.inspection",
    "load_dataset": "clipfusion.data",
    "EvaluationConfig": "clipfusion.evaluation.runner",
    "EvaluationRunner": "clipfusion.evaluation.runner",
    "ExportedDetector": "clipfusion.runtime.exported",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'clipfusion' has no attribute {name!r}")
