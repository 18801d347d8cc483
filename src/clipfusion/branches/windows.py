"""WinCLIP's masked windows: which patches each window covers, and harmonic aggregation to patches."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from clipfusion.errors import SettingError


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(W, size²) patch indices of every size×size window of a row-major grid, stride 1.

    Windows are listed row-major by their top-left patch; inside a window, patches are row-major too.
    """
    height, width = grid
    if not 1 <= size <= min(height, width):
        raise SettingError(f"window size {size} does not fit a {height}x{width} grid")
    index = torch.arange(height * width).view(1, 1, height, width).float()
    windows = torch.nn.functional.unfold(index, kernel_size=size, stride=1)  # (1, size², W)
    return windows[0].T.long()


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
