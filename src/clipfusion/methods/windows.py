"""WinCLIP's window map, shared by the WinCLIP baseline and PatchCLIP's ``window`` dense mode.

Windows come from :meth:`ClipEncoder.window_embeddings`; here each window's P(anomalous) is spread
back to the patches it covers by a harmonic mean, as WinCLIP (Jeong et al., CVPR 2023) does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from clipfusion.encoders.clip import state_probability
from clipfusion.geometry import window_indices


def harmonic_aggregate(window_scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """(B, W) window scores → (B, n_patches): per patch, the harmonic mean over the windows covering it.

    The harmonic mean lets one low (normal-looking) window pull a patch down, as WinCLIP does.
    """
    membership = torch.zeros(windows.shape[0], n_patches, dtype=window_scores.dtype, device=window_scores.device)
    membership.scatter_(1, windows.to(window_scores.device), 1.0)
    inverse_sum = (1.0 / window_scores.clamp_min(1e-12)) @ membership
    return membership.sum(dim=0) / inverse_sum


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of equally shaped score maps."""
    stack = torch.stack(list(maps))
    return stack.shape[0] / (1.0 / stack.clamp_min(1e-12)).sum(dim=0)


def window_zero_shot_map(grid: tuple[int, int], windows: dict[int, torch.Tensor], prototypes: torch.Tensor,
                         image_score: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, h*w): WinCLIP's zero-shot map on a ``grid`` of patches.

    windows: {scale: (B, W, D)} window embeddings; prototypes: (2, D); image_score: (B,).
    Per scale, each window's P(anomalous) is spread to the patches it covers by harmonic
    aggregation; the result is the harmonic mean of the image-scale score and every scale's map.
    """
    n_patches = grid[0] * grid[1]
    maps = [image_score[:, None].expand(-1, n_patches)]
    for scale, embedded in windows.items():
        scores = state_probability(embedded, prototypes, temperature)
        maps.append(harmonic_aggregate(scores, window_indices(grid, scale), n_patches))
    return harmonic_mean(maps)
