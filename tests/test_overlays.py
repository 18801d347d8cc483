from __future__ import annotations

import numpy as np
from matplotlib import colormaps

from clipfusion.overlays import COLORMAP, overlay


def test_overlay_uses_the_given_scale_not_the_image_range():
    image = np.full((16, 16, 3), 128, np.uint8)
    low_map = np.full((8, 8), 0.1, np.float32)
    low_map[0, 0] = 0.12  # a per-image min-max would paint this pixel red
    picture = overlay(image, low_map, vmin=0.0, vmax=1.0, opacity=1.0)
    blue = (np.array(colormaps[COLORMAP](0.1)[:3]) * 255).round()
    assert np.abs(picture[8, 8].astype(float) - blue).max() <= 2
    red_channel, _, blue_channel = picture[0, 0].astype(int)
    assert blue_channel - red_channel > 150  # still blue: the scale is [0, 1], not [0.1, 0.12]
    hot = overlay(image, np.ones((8, 8), np.float32), vmin=0.0, vmax=1.0, opacity=1.0)
    red = (np.array(colormaps[COLORMAP](1.0)[:3]) * 255).round()
    assert np.abs(hot[8, 8].astype(float) - red).max() <= 2


def test_overlay_draws_the_ground_truth_outline():
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    picture = overlay(image, np.zeros((32, 32), np.float32), 0.0, 1.0, mask=mask)
    assert (picture[8, 8:24] == 255).all()  # the outline
    assert not (picture[16, 16] == 255).all()  # not the inside
