"""Token sequences ↔ spatial grids.  Every such reshape goes through here: grids are row-major."""
from __future__ import annotations

import torch


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
