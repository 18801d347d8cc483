"""The Python API's image inputs: paths, Pillow images and arrays of several dtypes give the same result."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipfusion.errors import ClipfusionError
from clipfusion.images import as_rgb_list
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.mean_image import MeanImageDetector


def _image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_every_accepted_form_becomes_the_same_rgb_pixels(tmp_path):
    rgb = _image()
    Image.fromarray(rgb).save(tmp_path / "part.png")
    forms = [rgb, tmp_path / "part.png", str(tmp_path / "part.png"), Image.fromarray(rgb),
             rgb.astype(np.float32) / 255.0, rgb.astype(np.uint16) * 257,
             np.concatenate([rgb, np.full((48, 64, 1), 7, np.uint8)], axis=2)]  # RGBA: alpha dropped
    for form in forms:
        (converted,) = as_rgb_list(form)
        np.testing.assert_array_equal(converted, rgb, err_msg=type(form).__name__)
    gray = rgb[:, :, 0]
    for form in (gray, gray[:, :, None], Image.fromarray(gray)):
        np.testing.assert_array_equal(as_rgb_list(form)[0], np.repeat(gray[:, :, None], 3, axis=2))
    assert len(as_rgb_list(np.stack([rgb, rgb]))) == 2  # (N, H, W, C) is N images
    assert len(as_rgb_list([rgb, tmp_path / "part.png"])) == 2


@pytest.mark.parametrize(("bad", "message"), [
    (np.full((8, 8, 3), 1.5, np.float32), "in \\[0, 1\\]"),
    (np.zeros((8, 8, 2), np.uint8), "must be \\(H, W\\)"),
    (np.zeros((8, 8, 3), np.int64), "dtype int64"),
    (42, "cannot read int"),
])
def test_unusable_inputs_are_clear_errors(bad, message):
    with pytest.raises(ClipfusionError, match=message):
        as_rgb_list(bad)


def test_detector_takes_a_path_a_single_array_and_gives_maps_at_input_size(tmp_path):
    normal, query = _image(seed=1), _image(72, 40, seed=2)
    Image.fromarray(query).save(tmp_path / "query.png")
    detector = CLIPFusion("tiny").fit(normal, "plate")
    from_list = detector.predict([query], "plate")
    for other in (query, tmp_path / "query.png", Image.fromarray(query)):
        prediction = detector.predict(other, "plate")
        np.testing.assert_array_equal(prediction.maps, from_list.maps)
        np.testing.assert_array_equal(prediction.scores, from_list.scores)
    (full,) = from_list.maps_at_input_size()
    assert full.shape == (72, 40)
    expected = torch.nn.functional.interpolate(torch.from_numpy(from_list.maps[:, None]), size=(72, 40),
                                               mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(full, expected, rtol=1e-6, atol=1e-7)
    baseline = MeanImageDetector().fit([normal], "plate").predict(query, "plate")
    assert baseline.maps_at_input_size()[0].shape == (72, 40)
