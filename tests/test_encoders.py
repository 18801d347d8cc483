"""The encoders read exactly what they claim, on tiny random models (and real architectures on meta)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfusion.config import ClipConfig, DiffusionConfig, RuntimeConfig, get_preset
from clipfusion.encoders import ClipEncoder, DiffusionEncoder, WeightsNotFoundError
from clipfusion.encoders.attention import cross_attention_layers
from clipfusion.encoders.diffusion import vae_latents
from clipfusion.encoders.loading import build_diffusion_from_configs, load_open_clip

PROMPTS = ["a photo of a flawless disc", "a photo of a damaged disc"]
# the encoders are held to torch's and diffusers' own computations in float32, on either CPU kind
FLOAT32 = RuntimeConfig("cpu", "float32")


@pytest.fixture(scope="module")
def clip() -> ClipEncoder:
    return ClipEncoder.from_config(get_preset("tiny").clip, FLOAT32)


@pytest.fixture(scope="module")
def diffusion() -> DiffusionEncoder:
    return DiffusionEncoder.from_config(get_preset("tiny").diffusion, FLOAT32)


def _images(n: int = 2, seed: int = 0, shape: tuple[int, int] = (96, 128)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


# --- CLIP ----------------------------------------------------------------------------------------

def test_dense_path_leaves_the_global_embedding_bit_identical(clip):
    pixels = clip.preprocess(_images())
    with torch.inference_mode():  # the same attention kernels as the encoder's inference path
        reference = F.normalize(clip.model.encode_image(pixels).float(), dim=-1)
    with_dense = clip.encode_image(pixels, blocks=[0, -1], dense=True)
    without_dense = clip.encode_image(pixels, dense=False)
    assert torch.equal(with_dense.global_embedding, reference)
    assert torch.equal(without_dense.global_embedding, reference)
    assert without_dense.dense_embedding is None


def test_clip_shapes_and_normalisation(clip):
    out = clip.encode_image(clip.preprocess(_images(3)), blocks=[0, -1])
    h, w = clip.grid_size
    assert out.global_embedding.shape == (3, 32)
    assert out.patch_tokens[0].shape == out.patch_tokens[-1].shape == (3, h * w, 64)
    assert out.dense_embedding.shape == (3, h * w, 32)
    torch.testing.assert_close(out.dense_embedding.norm(dim=-1), torch.ones(3, h * w))
    assert not torch.allclose(out.patch_tokens[0], out.patch_tokens[-1])


def test_last_block_tokens_are_the_plain_forward_tokens(clip):
    pixels = clip.preprocess(_images(1))
    clip.model.visual.output_tokens = True
    try:
        with torch.inference_mode():
            _, tokens = clip.model.visual(pixels)  # open_clip's own path: after ln_post
    finally:
        clip.model.visual.output_tokens = False
    ours = clip.encode_image(pixels, blocks=[-1], dense=False).patch_tokens[-1]
    with torch.inference_mode():
        torch.testing.assert_close(clip.model.visual.ln_post(ours), tokens.float())


@pytest.mark.parametrize(("row", "col"), [(0, 0), (2, 5), (7, 1)])
def test_token_grid_is_row_major_and_aligned_with_the_image(clip, row, col):
    """Change one patch of the input: the token at row·w + col (and only there) must change most."""
    image = np.full((64, 64, 3), 128, np.uint8)
    changed = image.copy()
    changed[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 255
    before = clip.encode_image(clip.preprocess([image]), blocks=[0])
    after = clip.encode_image(clip.preprocess([changed]), blocks=[0])
    w = clip.grid_size[1]
    for tokens_before, tokens_after in ((before.patch_tokens[0], after.patch_tokens[0]),
                                        (before.dense_embedding, after.dense_embedding)):
        change = (tokens_after - tokens_before).norm(dim=-1)[0]
        assert int(change.argmax()) == row * w + col


def test_text_embeddings_are_cached_and_ensembles_normalised(clip, monkeypatch):
    first = clip.encode_text(["a photo of a disc.", "a photo of a damaged disc."])
    calls = []
    original = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda tokens: calls.append(1) or original(tokens))
    assert clip.encode_text(["a photo of a disc.", "a photo of a damaged disc."]) is first
    assert calls == []
    prototypes = clip.encode_prompt_ensembles([["a photo of a disc.", "a disc."], ["a damaged disc."]])
    assert prototypes.shape == (2, 32)
    torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(2))
    expected = F.normalize(clip.encode_text(["a photo of a disc.", "a disc."]).mean(0), dim=-1)
    torch.testing.assert_close(prototypes[0], expected)


@pytest.mark.parametrize(("name", "grid", "width", "dim"),
                         [("ViT-B-16-plus-240", 15, 896, 640), ("ViT-L-14-336", 24, 1024, 768)])
def test_real_clip_architectures_on_the_meta_device(name, grid, width, dim):
    pretrained = "laion400m_e31" if "plus" in name else "openai"
    encoder = ClipEncoder(load_open_clip(ClipConfig(name, pretrained), RuntimeConfig(), device="meta"))
    assert encoder.grid_size == (grid, grid)
    out = encoder.encode_image(encoder.preprocess(_images(1)), blocks=[-1, 6])
    assert out.global_embedding.shape == (1, dim)
    assert out.patch_tokens[-1].shape == out.patch_tokens[6].shape == (1, grid * grid, width)
    assert out.dense_embedding.shape == (1, grid * grid, dim)
    assert out.global_embedding.device.type == "meta"


# --- diffusion -----------------------------------------------------------------------------------

def _plain_unet_inputs(encoder: DiffusionEncoder, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, encoder.latent_size, encoder.latent_size, generator=generator)
    context = encoder.encode_prompts(PROMPTS)
    return latents, torch.tensor([100, 100]), context


def test_capturing_processor_leaves_the_unet_output_unchanged():
    parts = build_diffusion_from_configs("tiny-unet", "tiny-vae", "tiny-text-encoder")
    default_processors = {type(p).__name__ for p in parts.unet.attn_processors.values()}
    tokens = parts.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    context = parts.text_encoder(tokens)[0].detach()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = parts.unet(latents, 100, encoder_hidden_states=context).sample
    encoder = DiffusionEncoder(parts, DiffusionConfig(model_id="tiny", image_size=128))
    processors = {k: type(p).__name__ for k, p in parts.unet.attn_processors.items()}
    assert {processors[f"{n}.processor"] for n in encoder.layer_names} == {"CrossAttnCaptureProcessor"}
    assert {v for k, v in processors.items() if k.removesuffix(".processor") not in encoder.layer_names} \
        == default_processors  # SDPA kept everywhere else
    encoder._state.active = True
    try:
        with torch.inference_mode():
            captured = parts.unet(latents, 100, encoder_hidden_states=context).sample
    finally:
        encoder._state.active = False
    torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-5)
    assert set(encoder._state.maps) == set(encoder.layer_names)


def test_captured_probabilities_equal_a_manual_softmax_in_every_layer(diffusion):
    """Each captured layer against plain torch attention on that layer's own to_q / to_k weights and the
    inputs it received (caught by pre-hooks on the diffusers modules, not by the capture processor)."""
    modules = dict(diffusion.unet.named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(name):
        def hook(_module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])
        return hook

    handles = [modules[name].register_forward_pre_hook(grab(name), with_kwargs=True) for name in diffusion.layer_names]
    try:
        out = diffusion.encode(diffusion.preprocess(_images()), PROMPTS, token_indices=None)
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == set(diffusion.layer_names) and len(seen) > 1
    for name, (hidden, context) in seen.items():
        attn = modules[name]
        batch, queries, _ = hidden.shape
        with torch.inference_mode():
            q = attn.to_q(hidden).view(batch, queries, attn.heads, -1).transpose(1, 2)
            k = attn.to_k(context).view(batch, context.shape[1], attn.heads, -1).transpose(1, 2)
            scale = q.shape[-1] ** -0.5
            manual = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(dim=1)  # (batch, Q, 77)
        captured = out.cross_attn_maps[name]  # (B, P, 77, h, w)
        as_tokens = captured.flatten(3).permute(0, 1, 3, 2).reshape(batch, queries, -1)
        torch.testing.assert_close(as_tokens, manual, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(captured.sum(dim=2), torch.ones_like(captured.sum(dim=2)))


def test_token_selection_keeps_the_chosen_columns(diffusion):
    pixels = diffusion.preprocess(_images())
    every = diffusion.encode(pixels, PROMPTS, token_indices=None)
    some = diffusion.encode(pixels, PROMPTS, token_indices=[5, 6])
    for name in diffusion.layer_names:
        torch.testing.assert_close(some.cross_attn_maps[name], every.cross_attn_maps[name][:, :, [5, 6]])


def test_early_exit_gives_the_full_pass_outputs_and_runs_fewer_blocks(diffusion):
    ran: list[str] = []
    modules = dict(diffusion.unet.named_modules())
    watched = [f"up_blocks.{i}" for i in range(len(diffusion.unet.up_blocks))] + ["conv_out"]
    handles = [modules[n].register_forward_hook(lambda *_a, n=n: ran.append(n)) for n in watched]
    pixels = diffusion.preprocess(_images())
    try:
        early = diffusion.encode(pixels, PROMPTS, token_indices=[5], stop_early=True)
        ran_early, ran[:] = list(ran), []
        full = diffusion.encode(pixels, PROMPTS, token_indices=[5], stop_early=False)
        ran_full = list(ran)
    finally:
        for handle in handles:
            handle.remove()
    assert ran_full == watched
    assert ran_early == ["up_blocks.0", "up_blocks.1", "up_blocks.2"]  # last needed: up_blocks.2
    assert early.cross_attn_maps.keys() == full.cross_attn_maps.keys()
    for name in full.cross_attn_maps:
        assert torch.equal(early.cross_attn_maps[name], full.cross_attn_maps[name])
    for block in full.features:
        assert torch.equal(early.features[block], full.features[block])


def test_hooks_are_removed_after_each_call(diffusion):
    diffusion.encode(diffusion.preprocess(_images(1)), PROMPTS[:1])
    assert all(not m._forward_hooks for m in diffusion.unet.modules())


def test_diffusion_outputs_shapes_and_determinism(diffusion):
    pixels = diffusion.preprocess(_images(3))
    first = diffusion.encode(pixels, PROMPTS, token_indices=[5])
    second = diffusion.encode(pixels, PROMPTS, token_indices=[5])
    for name, maps in first.cross_attn_maps.items():
        _, factor = cross_attention_layers(diffusion.unet)[name]
        side = diffusion.latent_size // factor
        assert maps.shape == (3, 2, 1, side, side)
        assert torch.equal(maps, second.cross_attn_maps[name])
    assert first.features[1].shape == (3, 2, 32, 8, 8)
    assert first.features[2].shape == (3, 2, 32, 16, 16)


def test_on_a_cpu_the_vae_encodes_one_image_per_call_with_the_batched_latents(diffusion, monkeypatch):
    """A batch through the VAE encoder one image at a time (faster on a CPU: benchmarks/vae_batch.py) gives
    the latents of diffusers' encoder run on the whole batch at once, in order."""
    pixels = diffusion.preprocess(_images(3))
    with torch.inference_mode():
        batched = vae_latents(diffusion.vae, pixels)
    encode, sizes = diffusion.vae.encode, []

    def counting(chunk: torch.Tensor) -> object:
        sizes.append(len(chunk))
        return encode(chunk)

    monkeypatch.setattr(diffusion.vae, "encode", counting)
    latents = diffusion.encode_latents(pixels)
    assert sizes == [1, 1, 1]
    torch.testing.assert_close(latents, batched, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents[0], latents[1])  # three different images, not one repeated


def test_one_noise_draw_is_shared_by_all_images_and_seeded(diffusion):
    latents = torch.zeros(2, 4, 16, 16)
    noised = diffusion.noised(latents)
    assert torch.equal(noised[0], noised[1])
    other_seed = DiffusionEncoder.from_config(get_preset("tiny", diffusion__noise_seed=1).diffusion)
    assert not torch.equal(other_seed.noised(latents), noised)


def test_features_are_aligned_with_the_image(diffusion):
    """A bright square in one corner changes the up-block features most in that corner."""
    base = np.full((128, 128, 3), 90, np.uint8)
    for (y, x), quadrant in (((8, 8), (0, 0)), ((88, 80), (1, 1)), ((10, 84), (0, 1))):
        changed = base.copy()
        changed[y:y + 32, x:x + 32] = 250
        before = diffusion.encode(diffusion.preprocess([base]), PROMPTS[:1]).features[2][0, 0]
        after = diffusion.encode(diffusion.preprocess([changed]), PROMPTS[:1]).features[2][0, 0]
        change = (after - before).norm(dim=0)  # (16, 16)
        row, col = divmod(int(change.argmax()), change.shape[1])
        assert (row // 8, col // 8) == quadrant


def test_word_token_indices_handle_words_split_into_several_tokens(diffusion):
    prompt = "a photo of a scratchedwidgetry disc"
    indices = diffusion.word_token_indices(prompt, "scratchedwidgetry")
    assert len(indices) > 1 and indices == list(range(indices[0], indices[0] + len(indices)))
    ids = diffusion.tokenizer(prompt).input_ids
    assert diffusion.tokenizer.decode([ids[i] for i in indices]).strip() == "scratchedwidgetry"
    assert diffusion.word_token_indices(PROMPTS[1], "damaged") == [5]
    with pytest.raises(ValueError, match="does not occur"):
        diffusion.word_token_indices(PROMPTS[0], "damaged")


@pytest.mark.parametrize(
    ("configs", "unet_params", "n_heads"),
    [(("sd15-unet", "sd-vae", "sd15-text-encoder"), 859.52, {8}),
     (("sd21-base-unet", "sd-vae", "sd21-base-text-encoder"), 865.91, {5, 10, 20})],
)
def test_real_stable_diffusion_architectures_on_the_meta_device(configs, unet_params, n_heads):
    parts = build_diffusion_from_configs(*configs, device="meta")
    assert sum(p.numel() for p in parts.unet.parameters()) / 1e6 == pytest.approx(unet_params, abs=0.01)
    assert sum(p.numel() for p in parts.vae.parameters()) / 1e6 == pytest.approx(83.65, abs=0.01)
    layers = cross_attention_layers(parts.unet)
    assert len(layers) == 16
    assert sorted(f for _, f in layers.values()) == [1] * 5 + [2] * 5 + [4] * 5 + [8]
    assert {m.heads for n, m in parts.unet.named_modules() if n in layers} == n_heads

    encoder = DiffusionEncoder(parts, DiffusionConfig())  # paper-recon geometry: 512 px, factors 2 and 4
    assert encoder.latent_size == 64
    pixels = encoder.preprocess(_images(1))
    assert pixels.shape == (1, 3, 512, 512)
    prompts = ["a photo of a flawless bottle", "a photo of a damaged bottle"]
    out = encoder.encode(pixels, prompts, token_indices=[5])
    assert len(out.cross_attn_maps) == 10  # down 1 and 2 (2 each), up 1 and 2 (3 each)
    for name, maps in out.cross_attn_maps.items():
        side = 64 // layers[name][1]
        assert maps.shape == (1, 2, 1, side, side)
    assert out.features[1].shape == (1, 2, 1280, 32, 32)
    assert out.features[2].shape == (1, 2, 640, 64, 64)


# --- loading -------------------------------------------------------------------------------------

def test_missing_clip_weights_offline_give_the_clear_error(tmp_path):
    runtime = RuntimeConfig(offline=True, cache_dir=str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as info:
        load_open_clip(ClipConfig("ViT-B-16-plus-240", "laion400m_e31"), runtime)
    message = str(info.value)
    for expected in ("ViT-B-16-plus-240", "laion400m_e31", str(tmp_path), "offline mode", "network access",
                     "local path"):
        assert expected in message


def test_missing_diffusion_weights_offline_give_the_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment variable alone is enough
    with pytest.raises(WeightsNotFoundError) as info:
        DiffusionEncoder.from_config(DiffusionConfig(), RuntimeConfig(cache_dir=str(tmp_path)))
    message = str(info.value)
    for expected in ("stable-diffusion-v1-5/stable-diffusion-v1-5", str(tmp_path), "network access", "local path"):
        assert expected in message


def test_stable_diffusion_loads_from_a_local_diffusers_folder_and_a_separate_autoencoder(tmp_path, monkeypatch):
    """The real loading path (``from_pretrained``), as an offline user gives it: ``diffusion__model_id`` a
    local diffusers folder, and ``diffusion__vae_id`` a separate autoencoder folder (as ``fast`` names
    TAESD): every weight read back equal to the saved models', and the hub never asked (an air-gapped
    machine would wait for its answer at every start), nor accelerate asked for on the terminal."""
    from clipfusion.encoders import loading
    from clipfusion.encoders.loading import load_diffusion

    def hub_answers(timeout: float) -> bool:
        raise AssertionError("the hub was asked for weights in local folders")

    monkeypatch.setattr(loading, "hub_answers", hub_answers)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    saved = build_diffusion_from_configs("tiny-unet", "tiny-vae", "tiny-text-encoder", seed=3)
    folder = tmp_path / "sd"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(saved, name).save_pretrained(folder / name)
    other_vae = build_diffusion_from_configs("tiny-unet", "tiny-vae", "tiny-text-encoder", seed=4).vae
    other_vae.save_pretrained(tmp_path / "vae")
    runtime = RuntimeConfig("cpu", "float32", offline=False)
    said: list[logging.LogRecord] = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = said.append  # type: ignore[method-assign]
    diffusers_log = logging.getLogger("diffusers")  # its own handler, not propagated: listened to directly
    monkeypatch.setattr(diffusers_log, "level", logging.WARNING)  # as a plain `clipfusion predict` leaves it
    diffusers_log.addHandler(listener)
    try:
        for vae_id, vae in ((None, saved.vae), (str(tmp_path / "vae"), other_vae)):
            loaded = load_diffusion(DiffusionConfig(model_id=str(folder), vae_id=vae_id), runtime)
            assert not [record.getMessage() for record in said if "accelerate" in record.getMessage()]
            for got, want in ((loaded.unet, saved.unet), (loaded.vae, vae), (loaded.text_encoder, saved.text_encoder)):
                want_state = want.state_dict()
                assert got.state_dict().keys() == want_state.keys()
                assert all(torch.equal(value, want_state[key]) for key, value in got.state_dict().items())
    finally:
        diffusers_log.removeHandler(listener)


def test_tiny_models_are_identical_across_builds():
    a = ClipEncoder.from_config(get_preset("tiny").clip)
    b = ClipEncoder.from_config(get_preset("tiny").clip)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_noise_draws_average_the_outputs_of_each_seeded_draw():
    """noise_draws = 2 is the mean of two single-draw encoders seeded 0 and 1."""
    images = _images(2)
    two = DiffusionEncoder.from_config(get_preset("tiny", diffusion__noise_draws=2).diffusion)
    singles = [DiffusionEncoder.from_config(get_preset("tiny", diffusion__noise_seed=s).diffusion) for s in (0, 1)]
    averaged = two.encode(two.preprocess(images), PROMPTS, token_indices=[5])
    outs = [e.encode(e.preprocess(images), PROMPTS, token_indices=[5]) for e in singles]
    assert not torch.allclose(outs[0].features[2], outs[1].features[2])  # the draws differ
    for name, maps in averaged.cross_attn_maps.items():
        torch.testing.assert_close(maps, (outs[0].cross_attn_maps[name] + outs[1].cross_attn_maps[name]) / 2)
    for block, grid in averaged.features.items():
        torch.testing.assert_close(grid, (outs[0].features[block] + outs[1].features[block]) / 2)


def test_vae_dtype_keeps_the_autoencoder_in_float32_under_a_bfloat16_unet():
    config = get_preset("tiny", diffusion__vae_dtype="float32").diffusion
    mixed = DiffusionEncoder.from_config(config, RuntimeConfig(dtype="bfloat16"))
    plain = DiffusionEncoder.from_config(get_preset("tiny").diffusion, FLOAT32)
    assert next(mixed.vae.parameters()).dtype == torch.float32
    assert next(mixed.unet.parameters()).dtype == torch.bfloat16
    images = _images(2)
    latents = mixed.encode_latents(mixed.preprocess(images))
    assert latents.dtype == torch.bfloat16
    torch.testing.assert_close(latents, plain.encode_latents(plain.preprocess(images)).to(torch.bfloat16))
    out = mixed.encode(mixed.preprocess(images), PROMPTS, token_indices=[5])
    assert all(torch.isfinite(m).all() for m in out.cross_attn_maps.values())


def test_text_embeddings_from_the_columns_up_to_the_end_token_equal_open_clips_over_all_77():
    from clipfusion.encoders.clip import encode_tokens

    parts = load_open_clip(get_preset("tiny").clip, RuntimeConfig("cpu", "float32"))
    model = parts.model
    prompts = ["a photo of a flawless disc", "a cropped photo of the damaged printed circuit board with a scratch",
               "bottle"]
    tokens = parts.tokenizer(prompts)
    seen: list[int] = []
    hook = model.transformer.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
    try:
        with torch.inference_mode():
            got = encode_tokens(model, tokens)
            expected = model.encode_text(tokens)  # open_clip's own, every column
    finally:
        hook.remove()
    longest = int(tokens.argmax(dim=-1).max()) + 1  # the longest prompt's end token, and the start token
    assert tokens.shape[1] == 77 and seen == [longest, 77] and longest < 20
    scale = float(expected.abs().max())
    assert scale > 0 and float((got - expected).abs().max()) <= 1e-5 * scale


def test_a_text_tower_that_pools_otherwise_runs_open_clips_own_call_on_every_column():
    from clipfusion.encoders.clip import encode_tokens

    parts = load_open_clip(get_preset("tiny").clip, RuntimeConfig("cpu", "float32"))
    model = parts.model
    model.text_pool_type = "last"  # the last column's output: the padding columns matter
    tokens = parts.tokenizer(["a photo of a flawless disc"])
    with torch.inference_mode():
        torch.testing.assert_close(encode_tokens(model, tokens), model.encode_text(tokens), atol=0, rtol=0)


def test_clip_weights_read_from_a_file_are_not_drawn_at_random_first(tmp_path, monkeypatch):
    import dataclasses

    from safetensors.torch import load_file, save_file

    from clipfusion.encoders.loading import TINY_CLIP_NAME

    drawn: list[tuple[int, ...]] = []
    kaiming = torch.nn.init.kaiming_uniform_

    def spy(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        drawn.append(tuple(tensor.shape))
        return kaiming(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)  # what nn.Linear's initialisation calls
    tiny = get_preset("tiny").clip
    random_model = load_open_clip(tiny, FLOAT32).model
    assert drawn  # random weights are drawn
    path = tmp_path / "clip.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in random_model.state_dict().items()}, str(path))
    drawn.clear()
    loaded = load_open_clip(dataclasses.replace(tiny, model_name=TINY_CLIP_NAME, pretrained=str(path)), FLOAT32).model
    assert drawn == []  # none drawn for weights the file holds
    assert torch.nn.init.kaiming_uniform_ is spy  # torch's initialisers are back after the build
    expected = load_file(str(path))
    state = loaded.state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    load_open_clip(tiny, FLOAT32)
    assert drawn  # and drawn again for the next random build
