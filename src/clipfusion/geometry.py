"""Where patches are, in torch: token sequences ↔ spatial grids, window indices, resizing map tensors.

Grids are row-major (token ``r * w + c`` is row r, column c); map tensors are resized bilinearly with
``align_corners=False`` (as torch and the field do).  Resizing NumPy images, masks and maps is in
:mod:`clipfusion.resampling`, which needs no torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfusion.errors import SettingError


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) → (B, C, h, w); token ``r * w + c`` lands at row r, column c."""
    batch, count, channels = tokens.shape
    height, width = grid
    if count != height * width:
        raise ValueError(f"{count} tokens do not fill a {height}x{width} grid")
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h*w, C), the inverse of :func:`tokens_to_grid`."""
    batch, channels, height, width = grid.shape
    return grid.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(W, size²) patch indices of every size×size window of a row-major grid, stride 1.

    Windows are listed row-major by their top-left patch; inside a window, patches are row-major too.
    """
    height, width = grid
    if not 1 <= size <= min(height, width):
        raise SettingError(f"window size {size} does not fit a {height}x{width} grid")
    index = torch.arange(height * width).view(1, 1, height, width).float()
    windows = F.unfold(index, kernel_size=size, stride=1)  # (1, size², W)
    return windows[0].T.long()


def resize_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) tensor → (B, H, W) float, bilinear, align_corners=False."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
