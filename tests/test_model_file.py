"""The inspection model file (``fit --out X.cfm``, ``predict --model X.cfm``, ``CLIPFusion.load``)."""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from clipfusion.data import read_rgb
from clipfusion.errors import ClipfusionError
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.clipfusion.model_file import read_card, with_digest

from .commands import clipfusion_here, results

# what `--dtype auto` resolves to on a CPU with native bfloat16 ("1") and without ("0")
AUTO_ON_CPU = {"1": "bfloat16", "0": "float32"}


def test_the_file_describes_itself_and_thresholds_come_from_held_out_normals(model_here, cpu_kind, synthetic_root):
    model = model_here
    card = read_card(model)
    assert (card.dtype, card.device) == (AUTO_ON_CPU[cpu_kind], "cpu")  # the precision its thresholds were derived in
    normal_dir = synthetic_root / "disc" / "train" / "good"
    assert (card.preset, card.overrides, card.category, card.prompt_name) == ("tiny", {"fusion__sigma": 2}, "disc",
                                                                              "disc")
    names = [r["name"] for r in card.references]
    assert len(names) == 2
    for reference in card.references:
        assert reference["sha256"] == hashlib.sha256((normal_dir / reference["name"]).read_bytes()).hexdigest()
    held_out = sorted(p for p in normal_dir.iterdir() if p.name not in names)
    assert card.thresholds.n_normals == len(held_out) == 2  # 4 normal images, 2 of them references
    # recomputed here, by the library's defaults (the command line's): a detector fitted on the same
    # references, scoring the held-out images
    detector = CLIPFusion("tiny", fusion__sigma=2).fit([read_rgb(normal_dir / n) for n in names], "disc")
    prediction = detector.predict([read_rgb(p) for p in held_out], "disc")
    assert card.thresholds.image == pytest.approx(float(np.quantile(prediction.scores, 0.99, method="higher")))
    assert card.thresholds.pixel == pytest.approx(float(np.quantile(prediction.maps, 0.999, method="higher")))
    assert card.thresholds.normal_max == pytest.approx(float(prediction.scores.max()))
    normalised = CLIPFusion.load(model).thresholds_.normalised(np.array([card.thresholds.image, -1e9, 1e9]))
    np.testing.assert_allclose(normalised, [0.5, 0.0, 1.0])


def test_a_loaded_model_predicts_like_the_fitted_detector(model_here, synthetic_root):
    model = model_here
    card = read_card(model)
    normal_dir = synthetic_root / "disc" / "train" / "good"
    fitted = CLIPFusion("tiny", fusion__sigma=2).fit([read_rgb(normal_dir / r["name"]) for r in card.references],
                                                      "disc")
    queries = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[:3]
    loaded = CLIPFusion.load(model)
    np.testing.assert_array_equal(loaded.predict(queries, "disc").maps, fitted.predict(queries, "disc").maps)


def test_predict_with_the_model_needs_no_other_option(model_here, cpu_kind, synthetic_root, tmp_path):
    model = model_here
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--model", str(model),
                             "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    threshold = read_card(model).thresholds.image
    assert summary["identity"]["image_threshold"] == threshold and "from the model file" in summary["how"]
    assert summary["identity"]["category"] == "disc" and summary["identity"]["preset"] == "tiny"
    rows = results(out)
    assert all(row["decision"] == ("NG" if row["score"] > threshold else "OK") for row in rows)
    assert {row["model_id"] for row in rows} == {hashlib.sha256(model.read_bytes()).hexdigest()}
    assert {row["precision"] for row in rows} == {summary["identity"]["precision"]} == {AUTO_ON_CPU[cpu_kind]}
    thresholds = read_card(model).thresholds
    for row in rows:  # 0.5 + (score - threshold) / (normal max - normal min), clipped to [0, 1]
        span = thresholds.normal_max - thresholds.normal_min
        expected = min(1.0, max(0.0, 0.5 + (row["score"] - threshold) / span))
        assert row["normalised_score"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("extra", "needle"), [
    (["--category", "fabric"], "--category fabric (the model file's category is disc)"),
    (["--preset", "fast"], "--preset fast (the model file's preset is tiny)"),
    (["--alpha", "0.3"], "--set/--alpha"),
    (["--method", "winclip"], "--method winclip"),
])
def test_options_that_contradict_the_model_are_named(model, synthetic_root, tmp_path, extra, needle):
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test" / "good"), "--model", str(model),
                             "--out", str(tmp_path / "o"), "--quiet", *extra)
    assert result.returncode == 2 and needle in result.stderr, result.stderr


def _rewrite(model, tmp_path, edit_card=None, format_tag=None):
    """The model file with its card edited, written again with a digest that matches: what the field checks
    behind the digest see (a file made by someone who knows the format, or a bug of our own)."""
    with safe_open(str(model), framework="pt") as handle:
        metadata = dict(handle.metadata())
    card = json.loads(metadata["model"])
    if edit_card:
        edit_card(card)
    metadata["model"] = json.dumps(card)
    if format_tag is not None:
        metadata["format"] = format_tag
    metadata.pop("digest")
    path = tmp_path / "tampered.cfm"
    path.write_bytes(with_digest(load_file(str(model)), metadata))
    return path


def _split(path):
    """A safetensors file as (header dict, tensor bytes)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(header, body):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_the_digest_covers_the_header_and_every_tensor_byte(model):
    header, body = _split(model)
    stored = header["__metadata__"].pop("digest")
    # computed here from the format's definition: SHA-256 of (SHA-256 of the canonical header) + the tensors
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert stored == hashlib.sha256(hashlib.sha256(canonical).hexdigest().encode() + body).hexdigest()


def _flip_a_bank_byte(header, body):
    name = sorted(k for k in header if k != "__metadata__")[0]
    start = header[name]["data_offsets"][0]
    return header, body[:start + 5] + bytes([body[start + 5] ^ 0x10]) + body[start + 6:]


def _zero_the_bank(header, body):
    return header, bytes(len(body))


def _edit_the_threshold(header, body):
    card = json.loads(header["__metadata__"]["model"])
    card["thresholds"]["image"] = 0.0
    header["__metadata__"]["model"] = json.dumps(card)
    return header, body


def _transpose_a_shape(header, body):
    name = next(k for k in header if k != "__metadata__" and header[k]["shape"][0] != header[k]["shape"][1])
    header[name]["shape"] = header[name]["shape"][::-1]  # the same bytes, another shape
    return header, body


def _drop_the_digest(header, body):
    del header["__metadata__"]["digest"]
    return header, body


@pytest.mark.parametrize(("tamper", "needle"), [
    (_flip_a_bank_byte, "does not match its digest"),
    (_zero_the_bank, "does not match its digest"),
    (_edit_the_threshold, "does not match its digest"),
    (_transpose_a_shape, "does not match its digest"),
    (_drop_the_digest, "carries no digest"),
])
def test_an_edited_or_damaged_model_file_is_a_one_line_error_and_nothing_is_scored(model, synthetic_root, tmp_path,
                                                                                   tamper, needle):
    edited = tmp_path / "edited.cfm"
    edited.write_bytes(_join(*tamper(*_split(model))))
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--model", str(edited), "--out",
                             str(out), "--quiet")
    assert result.returncode == 2 and needle in result.stderr and str(edited) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()
    with pytest.raises(ClipfusionError, match=needle):
        CLIPFusion.load(edited)


@pytest.mark.parametrize(("edit", "tag", "needle"), [
    (lambda card: card["thresholds"].__setitem__("image", float("nan")), None, "not a finite number"),
    (lambda card: card.__setitem__("overrides", {"fusion__alpha_seg": 2}), None, "settings are not valid"),
    (lambda card: card.__setitem__("category", "fabric"), None, "its bank was fit on 'disc'"),
    (None, "clipfusion-model/99", "format clipfusion-model/3"),
])
def test_a_tampered_model_file_is_refused(model, tmp_path, edit, tag, needle):
    path = _rewrite(model, tmp_path, edit, tag)
    with pytest.raises(ClipfusionError, match=needle):
        CLIPFusion.load(path)


def test_a_zero_shot_model_has_thresholds_and_no_bank(synthetic_root, tmp_path):
    path = tmp_path / "zero.cfm"
    result = clipfusion_here("fit", "--normal", str(synthetic_root / "disc" / "train" / "good"), "--category", "disc",
                             "--shots", "0", "--preset", "tiny", "--out", str(path), "--quiet")
    assert result.returncode == 0, result.stderr
    assert load_file(str(path)) == {}
    card = read_card(path)
    assert card.references == [] and card.thresholds.n_normals == 4
    assert not hasattr(CLIPFusion.load(path), "memory_bank_")


def test_a_bank_of_other_settings_is_refused_before_any_model_is_built(synthetic_root, tmp_path, monkeypatch):
    from clipfusion.encoders import cache
    from clipfusion.errors import MemoryBankMismatchError

    normal = sorted((synthetic_root / "disc" / "train" / "good").iterdir())[:1]
    bank = CLIPFusion("tiny").fit(normal, "disc").save_memory(tmp_path / "bank.safetensors")

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the bank's settings were checked")

    monkeypatch.setattr(cache, "clip_encoder", built)
    monkeypatch.setattr(cache, "diffusion_encoder", built)
    with pytest.raises(MemoryBankMismatchError, match="diffusion_image_size: bank 128 vs detector 512"):
        CLIPFusion("paper-recon").load_memory(bank)  # the 39 s hub wait before a misleading error
    with pytest.raises(MemoryBankMismatchError, match="timestep: bank 100 vs detector 300"):
        CLIPFusion("tiny", diffusion__timestep=300).load_memory(bank)


def test_adding_references_equals_fitting_on_all_of_them(synthetic_root):
    normal = sorted((synthetic_root / "disc" / "train" / "good").iterdir())
    grown = CLIPFusion("tiny").fit(normal[:2], "disc", ["a", "b"]).add_references(normal[2:3], "disc", ["c"])
    whole = CLIPFusion("tiny").fit(normal[:3], "disc", ["a", "b", "c"])
    assert grown.memory_bank_.manifest == whole.memory_bank_.manifest
    assert grown.memory_bank_.features.keys() == whole.memory_bank_.features.keys()
    for name, features in whole.memory_bank_.features.items():  # batches of 1 and 3: float noise only
        np.testing.assert_allclose(grown.memory_bank_.features[name].numpy(), features.numpy(), atol=1e-5)
    with pytest.raises(ClipfusionError, match="fit on 'disc', not 'fabric'"):
        grown.add_references(normal[:1], "fabric")
