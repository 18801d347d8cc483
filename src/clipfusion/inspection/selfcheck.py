"""The check ``serve`` and ``watch`` run when they load a model: its fingerprint recomputed on the probe
images (``inspection.fingerprint``; ``clipfusion doctor`` prints the whole table).  On *different* the
model is refused (``--self-check refuse``, the default) or served with a warning (``warn``)."""
from __future__ import annotations

import logging

from clipfusion.errors import ClipfusionError
from clipfusion.inspection.fingerprint import DIFFERENT, Comparison, compare, take_fingerprint
from clipfusion.inspection.models import ModelFile
from clipfusion.protocol import Detector

logger = logging.getLogger(__name__)
SELF_CHECKS = ("refuse", "warn", "off")


def self_check(model: ModelFile, detector: Detector, mode: str = "refuse", remote: bool = False
               ) -> Comparison | None:
    """Compare what ``detector`` (``model``'s, as loaded here; ``remote``: on Ray replicas, whose settings
    and weights are not seen from here) scores on the probes with the fingerprint; None when ``mode`` is
    ``off`` or the model has no fingerprint (written before them)."""
    if mode not in SELF_CHECKS:
        raise ClipfusionError(f"--self-check must be one of {', '.join(SELF_CHECKS)}, not {mode!r}")
    if mode == "off":
        return None
    if model.fingerprint is None:
        logger.info("model %s has no fingerprint (written before them): not checked; `clipfusion calibrate` "
                    "writes one", model.short_id)
        return None
    comparison = compare(model.fingerprint, take_fingerprint(detector, model.category),
                         scores_only=model.is_export or remote)
    summary = f"largest score difference {comparison.largest:.2e}, tolerance {comparison.tolerance:g}"
    if comparison.verdict != DIFFERENT:
        logger.info("model %s: self-check %s (%s)", model.short_id, comparison.verdict, summary)
        return comparison
    causes = "; ".join(f"{f.what} {f.recorded} -> {f.here}" for f in comparison.causes)
    message = (f"model {model.short_id} does not score here as it did when its thresholds were set ({causes}; "
               f"{summary}): they may not hold; recalibrate with `clipfusion calibrate` (`clipfusion doctor` "
               "shows the whole check)")
    if mode == "refuse":
        raise ClipfusionError(f"{message}, or give --self-check warn to run it anyway")
    logger.warning(message)
    return comparison
