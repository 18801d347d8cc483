"""Where pixels are: token sequences ↔ spatial grids, window indices, and every resize, in one place.

Grids are row-major (token ``r * w + c`` is row r, column c); maps are resized bilinearly with
``align_corners=False`` (as torch and the field do); masks with nearest-neighbour sampling (ground
truth is never blurred); images bicubically as a whole (no crop, so maps stay aligned with masks).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) array → (N, H, W) float32: :func:`resize_grid` for NumPy callers."""
    array = np.asarray(maps, dtype=np.float32)
    if array.shape[1:] == tuple(size):
        return array
    return resize_grid(torch.from_numpy(np.ascontiguousarray(array)), size).numpy()


def resize_image(image: np.ndarray, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """(H, W, 3) uint8 → (size[0], size[1], 3) uint8; whole image, no crop (keeps mask alignment)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool → (size) bool with nearest-neighbour sampling (ground truth is never blurred)."""
    height, width = size
    if mask.shape == (height, width):
        return mask
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(picture.resize((width, height), Image.Resampling.NEAREST)) > 0
