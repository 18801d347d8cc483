"""WinCLIP / WinCLIP+: window indices, harmonic aggregation and the window map against slow references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.encoders import cache
from clipfusion.geometry import window_indices
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.winclip import WinCLIP
from clipfusion.methods.windows import harmonic_aggregate, window_zero_shot_map

from .references import slow_window_map
from .scenes import pixel_auroc, scene


def test_window_indices_and_harmonic_aggregation_by_hand():
    windows = window_indices((3, 3), 2)
    assert windows.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    scores = torch.tensor([[0.2, 0.4, 0.5, 0.8]])
    aggregated = harmonic_aggregate(scores, windows, 9)
    assert aggregated[0, 0].item() == pytest.approx(0.2)  # one window covers the corner
    assert aggregated[0, 4].item() == pytest.approx(4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 0.8))
    assert aggregated[0, 1].item() == pytest.approx(2 / (1 / 0.2 + 1 / 0.4))


def test_window_maps_match_a_slow_per_window_reference():
    encoder = cache.clip_encoder(get_preset("tiny").clip, RuntimeConfig("cpu", "float32"))  # as the reference
    images = [scene(0, (4, 84))[0], scene(1)[0]]
    pixels = encoder.preprocess(images)
    prototypes = encoder.encode_prompt_ensembles([["a photo of a plate."], ["a photo of a damaged plate."]])
    out = encoder.encode_image(pixels, dense=False)
    image_score = (out.global_embedding @ prototypes.T / 0.07).softmax(-1)[:, 1]
    fast = window_zero_shot_map(encoder.grid_size, encoder.window_embeddings(pixels, (2, 3)), prototypes, image_score,
                                0.07)
    torch.testing.assert_close(fast, slow_window_map(encoder, pixels, prototypes, image_score, 0.07),
                               rtol=1e-5, atol=1e-5)


def test_winclip_zero_and_few_shot(scenes):
    normal, defective, masks = scenes
    zero_shot = WinCLIP("tiny").predict(defective, "plate")
    assert zero_shot.maps.shape == (8, 256, 256)
    few_shot = WinCLIP("tiny").fit(normal, "plate").predict(defective, "plate")
    # 0.85: measured 0.988 (tiny preset, these scenes; chance 0.5).  With the token grid transposed in
    # geometry.tokens_to_grid it measured 0.644, so a misaligned map fails here.
    assert pixel_auroc(masks, few_shot.maps) > 0.85
    assert not np.allclose(zero_shot.maps, few_shot.maps)



@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_towers_give_the_float32_maps(scenes, dtype):
    """At half precision (bfloat16 is the CPU default where BF16 is native, float16 the CUDA one) WinCLIP+'s
    patch memory and PatchCLIP's 'raw' read-out pass float32 tokens back through the tower's ln_post: they
    must be cast, and the maps stay those of float32."""
    normal, defective, masks = scenes
    half = RuntimeConfig(device="cpu", dtype=dtype)
    reference = WinCLIP("tiny").fit(normal, "plate").predict(defective[:4], "plate")
    lowered = WinCLIP("tiny", half).fit(normal, "plate").predict(defective[:4], "plate")
    assert pixel_auroc(masks[:4], lowered.maps) > 0.85
    spread = float(reference.maps.max() - reference.maps.min())
    assert np.abs(lowered.maps - reference.maps).max() < 0.05 * spread
    raw = CLIPFusion("tiny", half, patchclip__dense_mode="raw").predict(defective[:4], "plate")
    assert raw.maps.shape == (4, 256, 256)
    assert np.isfinite(raw.maps).all()
