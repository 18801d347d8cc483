"""The CLIPFusion detector on tiny random models: independent recomputations of each map, the spatial
pipeline end to end, memory banks, settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfusion.config import FusionConfig, RuntimeConfig, get_preset
from clipfusion.errors import MemoryBankMismatchError
from clipfusion.methods.clipfusion.detector import CLIPFusion

from .references import slow_window_map
from .scenes import CORNERS, SIZE, pixel_auroc

# what the tests that hold the maps to a reference computed by hand mean: float32 on any CPU
FLOAT32 = RuntimeConfig("cpu", "float32")


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
    assert pixel_auroc(masks, prediction.branch_maps["clip_visual"]) > 0.95
    assert pixel_auroc(masks, prediction.branch_maps["diff_visual"]) > 0.7
    assert pixel_auroc(masks, prediction.maps) > 0.9
    fine = CLIPFusion("tiny", fusion__sigma=0.0, diffusion__feature_blocks=(2, 3)).fit(normal, "plate")
    assert pixel_auroc(masks, fine.predict(defective, "plate").branch_maps["diff_visual"]) > 0.9
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


def test_visual_maps_are_brute_force_nearest_reference_distances(scenes):
    """clip_visual and diff_visual recomputed without the memory bank: every query position against every
    reference position, min of ½(1 − cos); diffusion blocks upsampled to the finest grid and averaged."""
    normal, defective, _ = scenes
    detector = CLIPFusion("tiny").fit(normal[:3], "plate")
    patchclip, mapdiff = detector._branches()

    def nearest(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        q = torch.nn.functional.normalize(queries.flatten(0, -2).float(), dim=-1)
        r = torch.nn.functional.normalize(references.flatten(0, -2).float(), dim=-1)
        return ((1 - q @ r.T) / 2).min(dim=1).values.view(queries.shape[:-1])

    clip_tokens = lambda images: patchclip.encoder.encode_image(  # noqa: E731
        patchclip.encoder.preprocess(images), blocks=[-1], dense=False).patch_tokens[-1]
    h, w = patchclip.encoder.grid_size
    expected_clip = nearest(clip_tokens(defective[:2]), clip_tokens(normal[:3])).view(2, h, w)
    prompt = mapdiff.state_prompts("plate").prompts[0]
    features = lambda images: mapdiff.encoder.encode(  # noqa: E731
        mapdiff.encoder.preprocess(images), [prompt], token_indices=[5]).features
    queries, references = features(defective[:2]), features(normal[:3])
    finest = max(grid.shape[-1] for grid in queries.values())
    per_block = []
    for block, grid in queries.items():
        distance = nearest(grid[:, 0].permute(0, 2, 3, 1), references[block][:, 0].permute(0, 2, 3, 1))
        per_block.append(torch.nn.functional.interpolate(distance[:, None], size=(finest, finest), mode="bilinear",
                                                         align_corners=False)[:, 0])
    maps = detector.encode(defective[:2], "plate")
    np.testing.assert_allclose(maps.clip_visual, expected_clip.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.diff_visual, (sum(per_block) / len(per_block)).numpy(), rtol=1e-4, atol=1e-5)
    zero_shot = CLIPFusion("tiny").encode(defective[:2], "plate")
    assert zero_shot.clip_visual is None and zero_shot.diff_visual is None
    prediction = CLIPFusion("tiny").predict(defective[:3], "plate")
    assert prediction.maps.shape == (3, 256, 256) and prediction.maps.dtype == np.float32


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


def _p_anomalous(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(anomalous) of a two-way softmax, written as the logistic of the similarity difference."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity_normal, similarity_anomalous = (unit @ prototypes.T.float()).unbind(-1)
    return torch.sigmoid((similarity_anomalous - similarity_normal) / temperature)


def _last_block_io(encoder, pixels):
    """The last vision block's input and output (B, 1 + h*w, C), captured with hooks on open_clip's module."""
    block = encoder.visual.transformer.resblocks[-1]
    seen = {}
    handles = [block.register_forward_pre_hook(lambda _m, args: seen.__setitem__("in", args[0])),
               block.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out))]
    try:
        with torch.inference_mode():
            encoder.model.encode_image(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return seen["in"], seen["out"]


def test_vv_dense_embedding_is_value_value_attention_on_the_last_block_input(scenes):
    """Recomputed from the last block's captured input: ln_1, value projection, per-head softmax(V Vᵀ/√d) V,
    out_proj, ln_post, projection, normalisation; no residual, no MLP.  Then the language map."""
    _, defective, _ = scenes
    patchclip, _ = CLIPFusion("tiny", FLOAT32, patchclip__dense_mode="vv")._branches()
    encoder = patchclip.encoder
    pixels = encoder.preprocess(defective[:2])
    block_input, _ = _last_block_io(encoder, pixels)
    attention = encoder.visual.transformer.resblocks[-1].attn
    heads, width = attention.num_heads, block_input.shape[-1]
    with torch.inference_mode():
        normed = encoder.visual.transformer.resblocks[-1].ln_1(block_input)
        values = normed @ attention.in_proj_weight[2 * width:].T + attention.in_proj_bias[2 * width:]
        per_head = values.view(2, -1, heads, width // heads).permute(0, 2, 1, 3)  # (B, heads, L, d)
        weights = torch.softmax(per_head @ per_head.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
        mixed = (weights @ per_head).permute(0, 2, 1, 3).reshape(2, -1, width)
        embedded = encoder.visual.ln_post(attention.out_proj(mixed)) @ encoder.visual.proj
        expected = torch.nn.functional.normalize(embedded, dim=-1)[:, 1:]
    out = encoder.encode_image(pixels, dense=True)
    torch.testing.assert_close(out.dense_embedding, expected, rtol=1e-4, atol=1e-5)
    language = patchclip.run(defective[:2], "plate").language_map
    prototypes = patchclip.prototypes("plate")
    h, w = encoder.grid_size
    torch.testing.assert_close(language, _p_anomalous(expected, prototypes, 0.07).view(2, h, w), rtol=1e-4, atol=1e-5)


def test_raw_dense_mode_reads_the_projected_final_patch_tokens(scenes):
    _, defective, _ = scenes
    patchclip, _ = CLIPFusion("tiny", patchclip__dense_mode="raw", patchclip__temperature=0.05)._branches()
    encoder = patchclip.encoder
    _, block_output = _last_block_io(encoder, encoder.preprocess(defective[:2]))
    with torch.inference_mode():
        projected = encoder.visual.ln_post(block_output[:, 1:]) @ encoder.visual.proj
    h, w = encoder.grid_size
    expected = _p_anomalous(projected, patchclip.prototypes("plate"), 0.05).view(2, h, w)
    torch.testing.assert_close(patchclip.run(defective[:2], "plate").language_map, expected, rtol=1e-4, atol=1e-5)


def test_tile_dense_mode_scores_each_crop_with_open_clip(scenes):
    """tile_grid 2 on a 128-px image: four 64-px crops, each through open_clip's own encode_image."""
    _, defective, _ = scenes
    patchclip, _ = CLIPFusion("tiny", patchclip__dense_mode="tile", patchclip__tile_grid=2)._branches()
    encoder = patchclip.encoder
    prototypes = patchclip.prototypes("plate")
    got = patchclip.run(defective[:2], "plate").language_map
    assert got.shape == (2, 2, 2)
    for b, image in enumerate(defective[:2]):
        for row in range(2):
            for col in range(2):
                crop = image[64 * row:64 * (row + 1), 64 * col:64 * (col + 1)]
                with torch.inference_mode():
                    embedded = encoder.model.encode_image(encoder.preprocess([crop]))
                expected = _p_anomalous(embedded, prototypes, 0.07)[0]
                torch.testing.assert_close(got[b, row, col], expected, rtol=1e-4, atol=1e-5)


def test_window_dense_mode_is_the_slow_window_map(scenes):
    _, defective, _ = scenes
    patchclip, _ = CLIPFusion("tiny", FLOAT32, patchclip__dense_mode="window")._branches()
    encoder = patchclip.encoder
    pixels = encoder.preprocess(defective[:2])
    prototypes = patchclip.prototypes("plate")
    with torch.inference_mode():
        image_score = _p_anomalous(encoder.model.encode_image(pixels), prototypes, 0.07)
    h, w = encoder.grid_size
    expected = slow_window_map(encoder, pixels, prototypes, image_score, 0.07).view(2, h, w)
    torch.testing.assert_close(patchclip.run(defective[:2], "plate").language_map, expected, rtol=1e-4, atol=1e-5)


def _word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in the tokenised prompt, found by subsequence search."""
    ids = tokenizer(prompt).input_ids
    piece = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(piece) + 1):
        if ids[start:start + len(piece)] == piece:
            return list(range(start, start + len(piece)))
    raise AssertionError(f"{word!r} not in {prompt!r}")


@pytest.mark.parametrize("rule", ["ratio", "anomalous", "difference"])
def test_mapdiff_language_map_aggregates_tokens_layers_and_words(scenes, rule):
    """From the raw attention on all 77 tokens: per word the mean over its tokens (a multi-token word
    included), each layer upsampled bilinearly to the latent grid, mean over layers, mean over the words
    of each state, then the rule."""
    _, defective, _ = scenes
    normal_words, anomalous_words = ("flawless", "perfect"), ("damaged", "scratchedwidgetry")
    _, mapdiff = CLIPFusion("tiny", mapdiff__normal_words=normal_words, mapdiff__anomalous_words=anomalous_words,
                            mapdiff__attention_rule=rule)._branches()
    encoder = mapdiff.encoder
    prompts = [f"a photo of a {word} plate" for word in normal_words + anomalous_words]
    raw = encoder.encode(encoder.preprocess(defective[:2]), prompts, token_indices=None).cross_attn_maps
    latent = (encoder.latent_size, encoder.latent_size)
    per_word = []
    for p, word in enumerate(normal_words + anomalous_words):
        positions = _word_positions(encoder.tokenizer, prompts[p], word)
        assert word != "scratchedwidgetry" or len(positions) > 1
        layers = [torch.nn.functional.interpolate(maps[:, p, positions].mean(dim=1, keepdim=True), size=latent,
                                                  mode="bilinear", align_corners=False)[:, 0] for maps in raw.values()]
        per_word.append(sum(layers) / len(layers))
    normal, anomalous = (per_word[0] + per_word[1]) / 2, (per_word[2] + per_word[3]) / 2
    expected = {"ratio": anomalous / (anomalous + normal), "anomalous": anomalous,
                "difference": (anomalous - normal + 1) / 2}[rule]
    got = mapdiff.run(defective[:2], "plate").language_map
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_naive_reference_gives_the_same_maps_as_the_fast_path(scenes):
    """Fast path (one batched UNet pass, early stop, SDPA outside the captured layers, one VAE encode)
    against the naive one (per prompt: VAE encode, full UNet, probabilities in every layer)."""
    normal, defective, _ = scenes
    fast = CLIPFusion("tiny", FLOAT32).fit(normal[:2], "plate")
    naive = CLIPFusion("tiny", FLOAT32, diffusion__naive=True).fit(normal[:2], "plate")
    fast_maps, naive_maps = fast.encode(defective[:3], "plate"), naive.encode(defective[:3], "plate")
    for name in ("diff_language", "diff_visual", "clip_language", "clip_visual"):
        np.testing.assert_allclose(getattr(fast_maps, name), getattr(naive_maps, name), rtol=1e-4, atol=1e-5)
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



def test_class_names_override_the_object_name_in_every_prompt():
    detector = CLIPFusion("tiny", prompts__class_names={"disc": "round plate"})
    assert detector.config.prompts.name_of("disc") == "round plate"
    assert detector.config.prompts.name_of("metal_nut") == "metal nut"  # the default rule
    assert get_preset("tiny").prompts.name_of("pcb3") == "printed circuit board"  # shipped VisA names
    patchclip, mapdiff = detector._branches()
    assert mapdiff.state_prompts("disc").prompts == ["a photo of a flawless round plate",
                                                     "a photo of a damaged round plate"]
    plain, _ = CLIPFusion("tiny")._branches()  # no override: "round_plate" → "round plate" by the default rule
    torch.testing.assert_close(patchclip.prototypes("disc"), plain.prototypes("round_plate"))
    assert not torch.allclose(patchclip.prototypes("disc"), plain.prototypes("disc"))


def test_a_string_for_a_word_list_is_one_word_not_its_letters():
    assert get_preset("tiny", mapdiff__normal_words="perfect").mapdiff.normal_words == ("perfect",)
    with pytest.raises(ValueError, match="noise_draws"):
        get_preset("tiny", diffusion__noise_draws=0)
    with pytest.raises(ValueError, match="vae_dtype"):
        get_preset("tiny", diffusion__vae_dtype="float8")


def test_more_neighbours_average_more_reference_distances(scenes):
    normal, defective, _ = scenes
    one = CLIPFusion("tiny").fit(normal, "plate").encode(defective[:2], "plate")
    three = CLIPFusion("tiny", memory__neighbours=3).fit(normal, "plate").encode(defective[:2], "plate")
    assert np.all(three.clip_visual >= one.clip_visual - 1e-6)  # a mean of the 3 nearest is never nearer
    assert float((three.clip_visual - one.clip_visual).max()) > 1e-4
