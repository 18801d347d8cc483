"""Token grids and resizing, against hand-built cases."""
from __future__ import annotations

import numpy as np
import torch

from clipfusion.geometry import grid_to_tokens, resize_maps, resize_mask, tokens_to_grid


def test_tokens_fill_the_grid_row_major_and_come_back():
    tokens = torch.arange(2 * 6 * 3).view(2, 6, 3)  # (B, h*w, C) with h, w = 2, 3
    grid = tokens_to_grid(tokens, (2, 3))
    assert grid.shape == (2, 3, 2, 3)
    assert grid[1, 2, 1, 0].item() == tokens[1, 1 * 3 + 0, 2].item()  # token r*w + c at row r, column c
    assert torch.equal(grid_to_tokens(grid), tokens)


def test_bilinear_maps_use_pixel_centres():
    """A 2-pixel row [0, 1] upsampled to 4 with align_corners=False: centres at -0.25, 0.25, 0.75, 1.25
    in source pixels, clamped at the borders → 0, 0.25, 0.75, 1."""
    maps = np.array([[[0.0, 1.0], [0.0, 1.0]]], dtype=np.float32)
    np.testing.assert_allclose(resize_maps(maps, (2, 4))[0, 0], [0.0, 0.25, 0.75, 1.0])


def test_masks_are_resized_without_blurring():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    resized = resize_mask(mask, (8, 8))
    assert resized.dtype == bool and resized.sum() == 16 and resized[:4, :4].all()
