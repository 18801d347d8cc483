"""CLIPFusion and WinCLIP on tiny random models: the maths exactly, the spatial pipeline end to end."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from clipfusion.config import FusionConfig, RuntimeConfig, get_preset
from clipfusion.encoders import cache
from clipfusion.errors import MemoryBankMismatchError
from clipfusion.geometry import resize_mask, window_indices
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.clipfusion.fusion import BranchMaps, fuse
from clipfusion.methods.memory import MemoryBank, nearest_distance
from clipfusion.methods.winclip import WinCLIP
from clipfusion.methods.windows import harmonic_aggregate, window_zero_shot_map

SIZE = 128


def _scene(seed: int, defect: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, lit grey surface; optionally a large dark square (40 px) with its top-left at ``defect``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = 150 + 25 * (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1))
    image = np.repeat(base[:, :, None], 3, axis=2) + rng.normal(0, 2, (SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), bool)
    if defect is not None:
        y, x = defect
        image[y:y + 40, x:x + 40] = (30, 25, 20)
        mask[y:y + 40, x:x + 40] = True
    return np.clip(image, 0, 255).astype(np.uint8), mask


CORNERS = [(4, 4), (4, 84), (84, 4), (84, 84)]


@pytest.fixture(scope="module")
def scenes():
    normal = [_scene(s)[0] for s in range(4)]
    defective = [_scene(10 + i, corner) for i, corner in enumerate(CORNERS * 2)]
    return normal, [img for img, _ in defective], np.stack([m for _, m in defective])


# --- memory and fusion maths --------------------------------------------------------------------

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


def _random_maps(fitted: bool, seed: int = 0) -> BranchMaps:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    return BranchMaps(clip_score=rand(3), clip_language=rand(3, 8, 8), diff_language=rand(3, 16, 16),
                      clip_visual=rand(3, 8, 8) if fitted else None, diff_visual=rand(3, 32, 32) if fitted else None)


def test_zero_shot_fusion_is_exactly_the_formula():
    maps = _random_maps(fitted=False)
    config = FusionConfig(alpha_seg=0.3, alpha_cls=0.3, sigma=0.0, output_size=32)
    up = lambda m: torch.nn.functional.interpolate(m[:, None], size=(32, 32), mode="bilinear")[:, 0]  # noqa: E731
    expected = 0.3 * up(maps.clip_language) + 0.7 * up(maps.diff_language)
    prediction = fuse(maps, config)
    np.testing.assert_array_equal(prediction.maps, expected.numpy())
    expected_scores = 0.5 * (maps.clip_score.numpy() + expected.flatten(1).amax(1).numpy())
    np.testing.assert_allclose(prediction.scores, expected_scores, rtol=1e-6)


def test_few_shot_fusion_adds_the_visual_maps_and_separate_alphas():
    maps = _random_maps(fitted=True)
    config = FusionConfig(alpha_seg=0.8, alpha_cls=0.2, sigma=0.0, output_size=32, score_rule="max")
    up = lambda m: torch.nn.functional.interpolate(m[:, None], size=(32, 32), mode="bilinear")[:, 0]  # noqa: E731
    clip_part = up(maps.clip_language) + up(maps.clip_visual)
    diff_part = up(maps.diff_language) + up(maps.diff_visual)
    prediction = fuse(maps, config)
    np.testing.assert_allclose(prediction.maps, (0.8 * clip_part + 0.2 * diff_part).numpy(), rtol=1e-6)
    np.testing.assert_allclose(prediction.scores, (0.2 * clip_part + 0.8 * diff_part).flatten(1).amax(1).numpy(),
                               rtol=1e-6)
    only_visual = fuse(maps, dataclasses.replace(config, maps=("clip_visual", "diff_visual")))
    np.testing.assert_allclose(only_visual.maps, (0.8 * up(maps.clip_visual) + 0.2 * up(maps.diff_visual)).numpy(),
                               rtol=1e-6)
    assert set(only_visual.branch_maps) == {"clip_visual", "diff_visual"}


def test_score_rules_and_smoothing():
    maps = _random_maps(fitted=False)
    base = FusionConfig(sigma=0.0, output_size=32)
    clip_only = fuse(maps, dataclasses.replace(base, score_rule="clip"))
    np.testing.assert_allclose(clip_only.scores, maps.clip_score.numpy())
    top = fuse(maps, dataclasses.replace(base, score_rule="topk", topk_fraction=0.1))
    flat = np.sort(top.maps.reshape(3, -1), axis=1)[:, -102:]
    np.testing.assert_allclose(top.scores, 0.5 * (maps.clip_score.numpy() + flat.mean(1)), rtol=1e-6)
    smooth = fuse(maps, dataclasses.replace(base, sigma=4.0))
    assert smooth.maps.std() < fuse(maps, base).maps.std()
    with pytest.raises(ValueError, match="score_rule"):
        fuse(maps, dataclasses.replace(base, score_rule="median"))


# --- WinCLIP windows against a slow reference -----------------------------------------------------

def test_window_indices_and_harmonic_aggregation_by_hand():
    windows = window_indices((3, 3), 2)
    assert windows.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    scores = torch.tensor([[0.2, 0.4, 0.5, 0.8]])
    aggregated = harmonic_aggregate(scores, windows, 9)
    assert aggregated[0, 0].item() == pytest.approx(0.2)  # one window covers the corner
    assert aggregated[0, 4].item() == pytest.approx(4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 0.8))
    assert aggregated[0, 1].item() == pytest.approx(2 / (1 / 0.2 + 1 / 0.4))


def test_window_maps_match_a_slow_per_window_reference():
    encoder = cache.clip_encoder(get_preset("tiny").clip, RuntimeConfig())
    images = [_scene(0, (4, 84))[0], _scene(1)[0]]
    pixels = encoder.preprocess(images)
    prototypes = encoder.encode_prompt_ensembles([["a photo of a plate."], ["a photo of a damaged plate."]])
    out = encoder.encode_image(pixels, dense=False)
    image_score = (out.global_embedding @ prototypes.T / 0.07).softmax(-1)[:, 1]
    fast = window_zero_shot_map(encoder.grid_size, encoder.window_embeddings(pixels, (2, 3)), prototypes, image_score,
                                0.07)

    visual = encoder.model.visual
    h, w = encoder.grid_size
    with torch.inference_mode():
        sequence = encoder.token_embeddings(pixels)  # checked against open_clip's own pooling below
        pooled = visual.ln_post(visual.transformer(sequence)[:, 0]) @ visual.proj
        torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), out.global_embedding)
        slow = torch.zeros(2, h * w)
        for b in range(2):
            scale_maps = []
            for k in (2, 3):
                covering: dict[int, list[float]] = {p: [] for p in range(h * w)}
                for top in range(h - k + 1):
                    for left in range(w - k + 1):
                        patches = [(top + r) * w + left + c for r in range(k) for c in range(k)]
                        tokens = sequence[b:b + 1, [0] + [p + 1 for p in patches]]
                        embedded = torch.nn.functional.normalize(
                            visual.ln_post(visual.transformer(tokens)[:, 0]) @ visual.proj, dim=-1)
                        score = (embedded @ prototypes.T / 0.07).softmax(-1)[0, 1].item()
                        for p in patches:
                            covering[p].append(score)
                scale_maps.append([len(v) / sum(1 / s for s in v) for v in covering.values()])
            for p in range(h * w):
                terms = [image_score[b].item(), scale_maps[0][p], scale_maps[1][p]]
                slow[b, p] = 3 / sum(1 / t for t in terms)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


# --- the detector end to end --------------------------------------------------------------------

def _pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    resized = np.stack([resize_mask(m, maps.shape[1:]) for m in masks])
    return roc_auc_score(resized.ravel(), maps.ravel())


def test_few_shot_maps_localise_large_plain_defects(scenes):
    """Untrained tiny models still see a 40 px dark square on a smooth surface when they can compare
    with references: the visual maps (and the fused map) must rank defect pixels first.

    Bars from measurements on this data (tiny preset, σ = 0; chance is 0.5): CLIP visual 0.99;
    diffusion visual 0.79 with the default up-blocks 1 and 2 (block 1 is an 8×8 grid in the tiny
    UNet, which blurs the square) and 0.945 with the finer blocks 2 and 3; fused 0.98.  The bars
    leave room for platform rounding but not for a transposed, flipped or shifted grid.
    """
    normal, defective, masks = scenes
    detector = CLIPFusion("tiny", fusion__sigma=0.0).fit(normal, "plate")
    prediction = detector.predict(defective, "plate")
    assert _pixel_auroc(masks, prediction.branch_maps["clip_visual"]) > 0.95
    assert _pixel_auroc(masks, prediction.branch_maps["diff_visual"]) > 0.7
    assert _pixel_auroc(masks, prediction.maps) > 0.9
    fine = CLIPFusion("tiny", fusion__sigma=0.0, diffusion__feature_blocks=(2, 3)).fit(normal, "plate")
    assert _pixel_auroc(masks, fine.predict(defective, "plate").branch_maps["diff_visual"]) > 0.9
    for amap, (y, x) in zip(prediction.maps, CORNERS * 2, strict=True):
        scale = amap.shape[0] / SIZE
        quadrants = [amap[:amap.shape[0] // 2, :amap.shape[1] // 2], amap[:amap.shape[0] // 2, amap.shape[1] // 2:],
                     amap[amap.shape[0] // 2:, :amap.shape[1] // 2], amap[amap.shape[0] // 2:, amap.shape[1] // 2:]]
        expected = (2 if y * scale >= amap.shape[0] / 2 else 0) + (1 if x * scale >= amap.shape[1] / 2 else 0)
        assert int(np.argmax([q.mean() for q in quadrants])) == expected


def test_query_equal_to_a_reference_has_zero_visual_distance(scenes):
    normal, _, _ = scenes
    detector = CLIPFusion("tiny").fit(normal[:2], "plate")
    maps = detector.encode(normal[:1], "plate")
    assert float(maps.clip_visual.max()) < 1e-5
    assert float(maps.diff_visual.max()) < 1e-5


def test_maps_stay_in_their_ranges_and_zero_shot_has_no_visual_maps(scenes):
    normal, defective, _ = scenes
    zero_shot = CLIPFusion("tiny").encode(defective[:3], "plate")
    assert zero_shot.clip_visual is None and zero_shot.diff_visual is None
    few_shot = CLIPFusion("tiny").fit(normal, "plate").encode(defective[:3], "plate")
    for name in ("clip_score", "clip_language", "diff_language", "clip_visual", "diff_visual"):
        values = getattr(few_shot, name)
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0, name
    prediction = CLIPFusion("tiny").predict(defective[:3], "plate")
    assert prediction.maps.shape == (3, 256, 256) and prediction.scores.shape == (3,)
    assert prediction.maps.dtype == np.float32


def test_same_inputs_give_identical_outputs(scenes):
    normal, defective, _ = scenes
    first = CLIPFusion("tiny").fit(normal, "plate").predict(defective[:2], "plate")
    second = CLIPFusion("tiny").fit(normal, "plate").predict(defective[:2], "plate")
    np.testing.assert_array_equal(first.maps, second.maps)
    np.testing.assert_array_equal(first.scores, second.scores)


def test_batching_does_not_change_results(scenes):
    normal, defective, _ = scenes
    whole = CLIPFusion("tiny", batch_size=8).fit(normal, "plate").predict(defective[:5], "plate")
    pieces = CLIPFusion("tiny", batch_size=2).fit(normal, "plate").predict(defective[:5], "plate")
    np.testing.assert_allclose(pieces.maps, whole.maps, atol=1e-5)
    np.testing.assert_allclose(pieces.scores, whole.scores, atol=1e-6)


def test_fusion_sweeps_reuse_encoder_outputs(scenes, monkeypatch):
    normal, defective, _ = scenes
    detector = CLIPFusion("tiny").fit(normal, "plate")
    maps = detector.encode(defective[:2], "plate")
    monkeypatch.setattr(detector, "encode", lambda *a, **k: pytest.fail("a fusion-level sweep ran the models"))
    alphas = [detector.fuse(maps, FusionConfig(alpha_seg=a, alpha_cls=a)).scores for a in (0.1, 0.5, 0.9)]
    assert not np.allclose(alphas[0], alphas[2])


def test_memory_bank_round_trip_and_mismatch(scenes, tmp_path):
    normal, defective, _ = scenes
    detector = CLIPFusion("tiny").fit(normal[:2], "plate", reference_names=["a.png", "b.png"])
    path = detector.save_memory(tmp_path / "plate.safetensors")
    reloaded = CLIPFusion("tiny").load_memory(path)
    assert reloaded.memory_bank_.manifest["references"] == ["a.png", "b.png"]
    assert reloaded.memory_bank_.manifest["k"] == 2
    for name, tensor in detector.memory_bank_.features.items():
        assert torch.equal(reloaded.memory_bank_.features[name], tensor)
    np.testing.assert_array_equal(reloaded.predict(defective[:2], "plate").maps,
                                  detector.predict(defective[:2], "plate").maps)
    with pytest.raises(MemoryBankMismatchError, match=r"timestep: bank 100 vs detector 300"):
        CLIPFusion("tiny", diffusion__timestep=300).load_memory(path)
    with pytest.raises(Exception, match="fit on 'plate', not 'disc'"):
        reloaded.predict(defective[:1], "disc")


def test_winclip_zero_and_few_shot(scenes):
    normal, defective, masks = scenes
    zero_shot = WinCLIP("tiny").predict(defective, "plate")
    assert zero_shot.maps.shape == (8, 256, 256)
    few_shot = WinCLIP("tiny").fit(normal, "plate").predict(defective, "plate")
    assert _pixel_auroc(masks, few_shot.maps) > 0.85  # its visual memory finds the squares as well
    assert not np.allclose(zero_shot.maps, few_shot.maps)


def test_dense_modes_all_give_maps_in_range(scenes):
    _, defective, _ = scenes
    for mode in ("vv", "window", "tile", "raw"):
        maps = CLIPFusion("tiny", patchclip__dense_mode=mode).encode(defective[:2], "plate")
        assert maps.clip_language.min() >= 0 and maps.clip_language.max() <= 1, mode
        assert maps.clip_language.shape[0] == 2


def test_memory_bank_refuses_foreign_files(tmp_path):
    path = tmp_path / "bank.safetensors"
    path.write_text("nonsense")
    with pytest.raises(Exception, match="not a clipfusion memory bank"):
        MemoryBank.load(path)


def test_naive_reference_gives_the_same_maps_as_the_fast_path(scenes):
    """Fast path (one batched UNet pass, early stop, SDPA outside the captured layers, one VAE encode)
    against the naive one (per prompt: VAE encode, full UNet, probabilities in every layer)."""
    normal, defective, _ = scenes
    fast = CLIPFusion("tiny").fit(normal[:2], "plate")
    naive = CLIPFusion("tiny", diffusion__naive=True).fit(normal[:2], "plate")
    fast_maps, naive_maps = fast.encode(defective[:3], "plate"), naive.encode(defective[:3], "plate")
    for name in ("diff_language", "diff_visual", "clip_language", "clip_visual"):
        torch.testing.assert_close(getattr(fast_maps, name), getattr(naive_maps, name), rtol=1e-4, atol=1e-5)
    assert naive.timings_.seconds["unet"] > 0 and "vae" not in naive.timings_.seconds
    assert set(fast.timings_.seconds) >= {"clip", "vae", "unet", "maps", "memory"}


def test_fast_preset_geometry_with_random_tiny_autoencoder(scenes):
    _, defective, _ = scenes
    detector = CLIPFusion("tiny", diffusion__vae_id="random:taesd", diffusion__image_size=64)
    maps = detector.encode(defective[:2], "plate")
    assert maps.diff_language.shape == (2, 8, 8)  # 64 px through TAESD's factor 8
    assert detector.predict(defective[:2], "plate").maps.shape == (2, 256, 256)
    assert get_preset("fast").diffusion.image_size == 256
    assert get_preset("fast").diffusion.vae_id == "madebyollin/taesd"


def test_joint_prompt_runs_one_unet_row_per_image(scenes, monkeypatch):
    _, defective, _ = scenes
    detector = CLIPFusion("tiny", mapdiff__joint_prompt=True)
    _, mapdiff = detector._branches()
    state = mapdiff.state_prompts("plate")
    assert state.prompts == ["a photo of a flawless or damaged plate"]
    assert state.words == [(0, [5]), (0, [7])]
    rows = []
    original = mapdiff.encoder.run_unet
    monkeypatch.setattr(mapdiff.encoder, "run_unet", lambda latents, prompts, *a, **k: rows.append(
        len(latents) * len(prompts)) or original(latents, prompts, *a, **k))
    maps = detector.encode(defective[:3], "plate")
    assert rows == [3]
    assert float(maps.diff_language.min()) >= 0 and float(maps.diff_language.max()) <= 1


def test_fit_runs_one_unet_row_per_reference(scenes, monkeypatch):
    normal, _, _ = scenes
    detector = CLIPFusion("tiny")
    _, mapdiff = detector._branches()
    rows = []
    original = mapdiff.encoder.run_unet
    monkeypatch.setattr(mapdiff.encoder, "run_unet", lambda latents, prompts, *a, **k: rows.append(
        len(latents) * len(prompts)) or original(latents, prompts, *a, **k))
    detector.fit(normal[:3], "plate")
    assert rows == [3]  # the feature prompt only, not one row per state word
