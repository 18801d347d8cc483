"""Fusion and memory-bank maths, each against a direct computation."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from clipfusion.config import FusionConfig
from clipfusion.methods.clipfusion.fusion import BranchMaps, fuse
from clipfusion.methods.memory import MemoryBank, nearest_distance


def test_nearest_distance_matches_brute_force_and_is_zero_on_references(monkeypatch):
    rng = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(50, 8, generator=rng), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(30, 8, generator=rng), dim=1)
    queries[:5] = memory[10:15]
    monkeypatch.setattr("clipfusion.methods.memory.QUERY_CHUNK", 7)
    monkeypatch.setattr("clipfusion.methods.memory.MEMORY_CHUNK", 11)
    got = nearest_distance(queries, memory)
    expected = ((1 - queries @ memory.T) / 2).min(dim=1).values.clamp(0, 1)
    torch.testing.assert_close(got, expected)
    assert torch.all(got[:5].abs() < 1e-6)
    assert torch.all((got >= 0) & (got <= 1))


class _Tensors:
    """Random branch maps as torch tensors (the references compute with torch) and as fusion takes them."""

    def __init__(self, fitted: bool, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        self.clip_score, self.clip_language, self.diff_language = rand(3), rand(3, 8, 8), rand(3, 16, 16)
        self.clip_visual = rand(3, 8, 8) if fitted else None
        self.diff_visual = rand(3, 32, 32) if fitted else None

    def branch_maps(self) -> BranchMaps:
        def array(tensor: torch.Tensor | None) -> np.ndarray | None:
            return None if tensor is None else tensor.numpy()

        return BranchMaps(self.clip_score.numpy(), self.clip_language.numpy(), self.diff_language.numpy(),
                          array(self.clip_visual), array(self.diff_visual))


def test_zero_shot_fusion_is_exactly_the_formula():
    maps = _Tensors(fitted=False)
    config = FusionConfig(alpha_seg=0.3, alpha_cls=0.3, sigma=0.0, output_size=32)
    up = lambda m: torch.nn.functional.interpolate(m[:, None], size=(32, 32), mode="bilinear")[:, 0]  # noqa: E731
    expected = 0.3 * up(maps.clip_language) + 0.7 * up(maps.diff_language)
    prediction = fuse(maps.branch_maps(), config)
    np.testing.assert_allclose(prediction.maps, expected.numpy(), rtol=0, atol=1e-6)  # NumPy vs torch resize
    expected_scores = 0.5 * (maps.clip_score.numpy() + expected.flatten(1).amax(1).numpy())
    np.testing.assert_allclose(prediction.scores, expected_scores, rtol=1e-6)


def test_few_shot_fusion_adds_the_visual_maps_and_separate_alphas():
    maps = _Tensors(fitted=True)
    config = FusionConfig(alpha_seg=0.8, alpha_cls=0.2, sigma=0.0, output_size=32, score_rule="max")
    up = lambda m: torch.nn.functional.interpolate(m[:, None], size=(32, 32), mode="bilinear")[:, 0]  # noqa: E731
    clip_part = up(maps.clip_language) + up(maps.clip_visual)
    diff_part = up(maps.diff_language) + up(maps.diff_visual)
    prediction = fuse(maps.branch_maps(), config)
    np.testing.assert_allclose(prediction.maps, (0.8 * clip_part + 0.2 * diff_part).numpy(), rtol=1e-6)
    np.testing.assert_allclose(prediction.scores, (0.2 * clip_part + 0.8 * diff_part).flatten(1).amax(1).numpy(),
                               rtol=1e-6)
    only_visual = fuse(maps.branch_maps(), dataclasses.replace(config, maps=("clip_visual", "diff_visual")))
    np.testing.assert_allclose(only_visual.maps, (0.8 * up(maps.clip_visual) + 0.2 * up(maps.diff_visual)).numpy(),
                               rtol=1e-6)
    assert set(only_visual.branch_maps) == {"clip_visual", "diff_visual"}


def test_score_rules_and_smoothing():
    maps = _Tensors(fitted=False)
    base = FusionConfig(sigma=0.0, output_size=32)
    clip_only = fuse(maps.branch_maps(), dataclasses.replace(base, score_rule="clip"))
    np.testing.assert_allclose(clip_only.scores, maps.clip_score.numpy())
    top = fuse(maps.branch_maps(), dataclasses.replace(base, score_rule="topk", topk_fraction=0.1))
    flat = np.sort(top.maps.reshape(3, -1), axis=1)[:, -102:]
    np.testing.assert_allclose(top.scores, 0.5 * (maps.clip_score.numpy() + flat.mean(1)), rtol=1e-6)
    smooth = fuse(maps.branch_maps(), dataclasses.replace(base, sigma=4.0))
    assert smooth.maps.std() < fuse(maps.branch_maps(), base).maps.std()
    with pytest.raises(ValueError, match="score_rule"):
        fuse(maps.branch_maps(), dataclasses.replace(base, score_rule="median"))


def test_memory_bank_refuses_foreign_files(tmp_path):
    path = tmp_path / "bank.safetensors"
    path.write_text("nonsense")
    with pytest.raises(Exception, match="not a clipfusion memory bank"):
        MemoryBank.load(path)



@pytest.mark.parametrize(("output_size", "pixels"), [(64, 1.0), (256, 4.0), (512, 8.0)])
def test_sigma_is_given_at_256_pixels_and_scales_with_the_output_size(output_size, pixels):
    """fusion__sigma = 4 means 4 pixels at a 256-pixel output: 1 at 64, 8 at 512 (scipy's gaussian_filter)."""
    maps = _Tensors(fitted=False)
    config = FusionConfig(alpha_seg=0.4, alpha_cls=0.4, sigma=4.0, output_size=output_size)
    up = lambda m: torch.nn.functional.interpolate(  # noqa: E731
        m[:, None], size=(output_size, output_size), mode="bilinear")[:, 0]
    fused = (0.4 * up(maps.clip_language) + 0.6 * up(maps.diff_language)).numpy()
    expected = np.stack([ndimage.gaussian_filter(m, sigma=pixels) for m in fused])
    np.testing.assert_allclose(fuse(maps.branch_maps(), config).maps, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neighbours", [2, 3, 80])
def test_mean_of_k_nearest_matches_brute_force_across_chunks(monkeypatch, neighbours):
    rng = torch.Generator().manual_seed(1)
    memory = torch.nn.functional.normalize(torch.randn(50, 8, generator=rng), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(30, 8, generator=rng), dim=1)
    monkeypatch.setattr("clipfusion.methods.memory.QUERY_CHUNK", 7)
    monkeypatch.setattr("clipfusion.methods.memory.MEMORY_CHUNK", 11)
    distances = np.sort(((1 - queries @ memory.T) / 2).numpy(), axis=1)
    expected = distances[:, :min(neighbours, 50)].mean(axis=1)  # more neighbours than rows: every row
    np.testing.assert_allclose(nearest_distance(queries, memory, neighbours).numpy(), expected, rtol=1e-5, atol=1e-6)
