"""The one inspection core every front end calls: a model opened once (:class:`ModelFile`), an
:class:`Inspector` that turns images into :class:`Inspection` verdicts (maps at the image's size,
thresholds, regions), the one derivation of thresholds, and the writer of rows and files."""
from __future__ import annotations

from clipfusion.inspection.core import Inspection, Inspector
from clipfusion.inspection.models import ModelFile
from clipfusion.inspection.thresholds import Decisions, derive_thresholds

__all__ = ["Decisions", "Inspection", "Inspector", "ModelFile", "derive_thresholds"]
