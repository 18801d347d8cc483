"""Token grids and resizing, against hand-built cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfusion.geometry import grid_to_tokens, tokens_to_grid
from clipfusion.resampling import resize_maps, resize_mask


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


@pytest.mark.parametrize(("source", "target"), [((8, 8), (256, 256)), ((7, 9), (100, 333)), ((64, 64), (17, 5)),
                                                 ((15, 15), (240, 240)), ((225, 300), (15, 15))])
def test_numpy_bilinear_resize_matches_torch_interpolate(source, target):
    """The torch-free resize (used by fusion and the exported runtime) against F.interpolate, up and down."""
    maps = np.random.default_rng(0).random((2, *source), dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(maps)[:, None], size=target, mode="bilinear", align_corners=False)
    got = resize_maps(maps, target)
    assert got.shape == (2, *target) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[:, 0].numpy(), rtol=0, atol=1e-6)


def test_masks_are_resized_without_blurring():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    resized = resize_mask(mask, (8, 8))
    assert resized.dtype == bool and resized.sum() == 16 and resized[:4, :4].all()
