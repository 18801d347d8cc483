"""The two foundation models, read exactly where CLIPFusion needs them."""
from __future__ import annotations

from clipfusion.encoders.clip import ClipEncoder, ClipImageOutput
from clipfusion.encoders.diffusion import DiffusionEncoder, DiffusionOutput
from clipfusion.errors import WeightsNotFoundError

__all__ = ["ClipEncoder", "ClipImageOutput", "DiffusionEncoder", "DiffusionOutput", "WeightsNotFoundError"]
