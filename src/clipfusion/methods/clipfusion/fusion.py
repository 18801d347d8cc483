"""Fusion of the branch maps into the pixel map and the image score.

M = α (M_clip_L + M_clip_V) + (1 − α)(M_diff_L + M_diff_V), every map first resized bilinearly to
the output size; the visual terms exist only when the detector was fitted.  Maps are never
min-max normalised per image, so scores stay comparable across images.  NumPy only: the exported
runtime (no torch) fuses with this same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from clipfusion.config import MAP_NAMES, SCORE_RULES, FusionConfig
from clipfusion.errors import SettingError
from clipfusion.protocol import Prediction
from clipfusion.resampling import resize_maps


@dataclass
class BranchMaps:
    """Everything fusion needs for B images, each map on its branch's own grid (float32 NumPy arrays).

    clip_score: (B,) s_clip.  clip_language (B, h_c, w_c), diff_language (B, h_d, w_d); the visual maps
    likewise, or None in zero-shot.  Fusion-level sweeps (α, σ, score rule, which maps) reuse one
    BranchMaps without running any model again.
    """

    clip_score: np.ndarray
    clip_language: np.ndarray
    diff_language: np.ndarray
    clip_visual: np.ndarray | None = None
    diff_visual: np.ndarray | None = None

    @staticmethod
    def concat(parts: list[BranchMaps]) -> BranchMaps:
        def optional(values: list[np.ndarray | None]) -> np.ndarray | None:
            present = [v for v in values if v is not None]
            return np.concatenate(present) if present else None

        return BranchMaps(clip_score=np.concatenate([p.clip_score for p in parts]),
                          clip_language=np.concatenate([p.clip_language for p in parts]),
                          diff_language=np.concatenate([p.diff_language for p in parts]),
                          clip_visual=optional([p.clip_visual for p in parts]),
                          diff_visual=optional([p.diff_visual for p in parts]))


def _smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma)) if sigma > 0 else maps


def _branch_sum(resized: dict[str, np.ndarray], prefix: str, like: np.ndarray) -> np.ndarray:
    terms = [m for name, m in resized.items() if name.startswith(prefix)]
    return np.stack(terms).sum(axis=0, dtype=np.float32) if terms else np.zeros_like(like)


def fuse(maps: BranchMaps, config: FusionConfig) -> Prediction:
    """Pixel maps (N, S, S) with alpha_seg, image scores from a map fused with alpha_cls."""
    if config.score_rule not in SCORE_RULES:  # a FusionConfig built by hand skips config.check
        raise SettingError(f"score_rule must be one of {SCORE_RULES}, not {config.score_rule!r}")
    size = (config.output_size, config.output_size)
    resized = {name: resize_maps(getattr(maps, name), size) for name in MAP_NAMES
               if name in config.maps and getattr(maps, name) is not None}
    if not resized:
        raise SettingError("fusion has no map to fuse: enable at least one available map")
    like = next(iter(resized.values()))
    clip_part, diff_part = _branch_sum(resized, "clip_", like), _branch_sum(resized, "diff_", like)
    sigma = config.sigma * config.output_size / 256.0

    def fused(alpha: float) -> np.ndarray:
        return _smooth(np.float32(alpha) * clip_part + np.float32(1.0 - alpha) * diff_part, sigma).astype(np.float32)

    segmentation = fused(config.alpha_seg)
    classification = segmentation if config.alpha_cls == config.alpha_seg else fused(config.alpha_cls)
    flat = classification.reshape(len(classification), -1)
    clip_score = maps.clip_score.astype(np.float32)
    if config.score_rule == "clip":
        scores = clip_score
    elif config.score_rule == "max":
        scores = flat.max(axis=1)
    else:
        k = max(1, round(config.topk_fraction * flat.shape[1]))
        peak = flat.max(axis=1) if config.score_rule == "mean" else np.sort(flat, axis=1)[:, -k:].mean(axis=1)
        scores = 0.5 * (clip_score + peak)
    return Prediction(scores=scores.astype(np.float32), maps=segmentation, branch_maps=resized)
