"""clipfusion: zero- and few-shot anomaly detection with CLIP and Stable Diffusion."""
from __future__ import annotations

__version__ = "0.1.0"
