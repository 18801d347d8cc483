"""``clipfusion doctor``: the model file's fingerprint recomputed here, and each kind of change caught and
named — a changed setting, a tampered bank, another precision, another encoder weight file."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from clipfusion import config
from clipfusion.hardware import BF16_SCORE_TOLERANCE, NATIVE_BF16_SWITCH
from clipfusion.inspection.fingerprint import probe_images
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.clipfusion.model_file import with_digest

from .commands import clipfusion, clipfusion_here


def doctor(*args: str, fresh: bool = False) -> tuple[int, dict[str, list[str]]]:
    """Exit status and the table's rows (what → every value printed for it); ``fresh``: in a new process
    (this one keeps the encoders it loaded)."""
    done = (clipfusion if fresh else clipfusion_here)("doctor", *args, "--quiet")
    assert done.returncode in (0, 1), done.stderr
    rows: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        what, _, found = line.partition("  ")
        rows.setdefault(what.strip(), []).append(found.strip())
    return done.returncode, rows


def stored_fingerprint(model: Path) -> dict:
    with safe_open(str(model), framework="np") as handle:
        return json.loads(handle.metadata()["fingerprint"])


def test_the_same_machine_gives_same_and_the_file_records_what_ran(model, synthetic_root):
    recorded = stored_fingerprint(model)
    # independently of the fingerprint code: the probes scored by the detector loaded here
    expected = CLIPFusion.load(model).predict(probe_images(), "disc").scores
    assert recorded["probe_scores"] == pytest.approx([float(s) for s in expected], abs=1e-6)
    assert recorded["settings"]["fusion"]["sigma"] == 2 and recorded["dtype"] in ("float32", "bfloat16")
    assert set(recorded["weights"]) == {"clip", "unet", "vae", "text_encoder"}
    # the held-out normals: the good images that are not the two references, by content
    references = {r["sha256"] for r in json.loads(_metadata(model)["model"])["references"]}
    good = sorted((synthetic_root / "disc" / "train" / "good").glob("*.png"))
    assert len(recorded["normals"]) == len(good) - len(references) >= 1
    assert not references & {n["sha256"] for n in recorded["normals"]}

    status, rows = doctor("--model", str(model), "--normal", str(synthetic_root / "disc" / "train" / "good"))
    assert status == 0
    assert rows["verdict"][0].startswith("same ")
    assert rows["compared"] == [f"3 probe images, {len(recorded['normals'])} of {len(recorded['normals'])} held-out "
                                "normal images"]
    assert "contents match their digest" in rows["model file"][0]


def test_another_precision_is_within_tolerance_and_named(model_fitted_as, monkeypatch):
    """A model fitted in bfloat16 (a BF16 CPU) checked on a CPU without it: float32 runs, within the
    measured bf16/fp32 tolerance — never "different"."""
    bf16_model = model_fitted_as("1")
    assert stored_fingerprint(bf16_model)["dtype"] == "bfloat16"
    monkeypatch.setenv(NATIVE_BF16_SWITCH, "0")
    status, rows = doctor("--model", str(bf16_model))
    assert status == 0
    assert rows["verdict"][0].startswith("within tolerance ")
    assert "bfloat16 on cpu -> float32 on cpu" in rows["precision"]
    # the difference it reports is the one between the stored bf16 scores and float32 scores computed here
    here = CLIPFusion.load(bf16_model).predict(probe_images(), "disc").scores
    stored = stored_fingerprint(bf16_model)["probe_scores"]
    largest = float(np.max(np.abs(np.asarray(stored) - here)))
    assert 0 < largest <= BF16_SCORE_TOLERANCE
    assert float(rows["verdict"][0].split("largest score difference ")[1].split(";")[0]) >= largest - 1e-6


def test_a_changed_default_setting_is_different_and_named(model, monkeypatch):
    """A clipfusion upgrade that changes a preset's default (the file names the preset, not the value):
    one the bank was made with is refused at load, any other is caught by the fingerprint."""
    tiny = config.PRESETS["tiny"]
    monkeypatch.setitem(config.PRESETS, "tiny",
                        dataclasses.replace(tiny, diffusion=dataclasses.replace(tiny.diffusion, timestep=300)))
    status, rows = doctor("--model", str(model))
    assert status == 1
    [loads] = rows["model loads"]
    assert loads.startswith("FAILED: ") and "timestep: bank 100 vs detector 300" in loads

    monkeypatch.setitem(config.PRESETS, "tiny",
                        dataclasses.replace(tiny, patchclip=dataclasses.replace(tiny.patchclip, temperature=0.2)))
    status, rows = doctor("--model", str(model))
    assert status == 1
    assert rows["setting patchclip.temperature"] == ["0.07 -> 0.2"]
    assert rows["verdict"][0].startswith("different — thresholds may not hold: recalibrate")


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as handle:
        return dict(handle.metadata())


def _bank(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()
        return {name: handle.get_tensor(name) for name in names}


def test_a_tampered_bank_is_caught_by_the_digest_or_by_the_scores(model, tmp_path):
    # a flipped byte: the file no longer matches its digest
    flipped = tmp_path / "flipped.cfm"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    flipped.write_bytes(bytes(data))
    status, rows = doctor("--model", str(flipped))
    assert status == 1 and rows["model file"][0].startswith("FAILED: ") and "digest" in rows["model file"][0]

    # a bank rewritten with a digest made for it (the digest is no secret: signing is): the scores tell
    rewritten = _rewritten_bank(model, tmp_path / "rewritten.cfm")
    status, rows = doctor("--model", str(rewritten))
    assert status == 1
    assert "contents match their digest" in rows["model file"][0]
    assert "probe scores" in rows and not any(what.startswith(("setting", "weights")) for what in rows)
    assert rows["verdict"][0].startswith("different ")


def _diffusers_folder(folder: Path, unet_seed: int) -> Path:
    """The tiny Stable Diffusion written as a local diffusers folder (what a user's own checkpoint is)."""
    from clipfusion.encoders.loading import build_diffusion_from_configs

    parts = build_diffusion_from_configs("tiny-unet", "tiny-vae", "tiny-text-encoder")
    unet = build_diffusion_from_configs("tiny-unet", "tiny-vae", "tiny-text-encoder", seed=unet_seed).unet
    unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.scheduler.save_pretrained(folder / "scheduler")
    return folder


def test_another_encoder_weight_file_is_different_and_named(synthetic_root, tmp_path):
    weights = _diffusers_folder(tmp_path / "sd", unet_seed=0)
    model = tmp_path / "local.cfm"
    fitted = clipfusion_here("fit", "--normal", str(synthetic_root / "disc" / "train" / "good"), "--category", "disc",
                             "--shots", "1", "--preset", "tiny", "--set", f"diffusion__model_id={weights}",
                             "--out", str(model), "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    status, rows = doctor("--model", str(model))
    assert status == 0 and rows["verdict"][0].startswith("same ")

    shutil.rmtree(weights / "unet")  # the same folder, another UNet checkpoint in it
    _diffusers_folder(tmp_path / "other", unet_seed=1)
    shutil.copytree(tmp_path / "other" / "unet", weights / "unet")
    status, rows = doctor("--model", str(model), fresh=True)
    assert status == 1
    changed = [what for what in rows if what.startswith("weights ")]
    assert changed == ["weights unet"]
    assert rows["verdict"][0].startswith("different ")


def _rewritten_bank(model: Path, out: Path) -> Path:
    """``model`` with its bank halved and a digest made for it: intact to the digest, otherwise different."""
    bank = {key: value * 0.5 for key, value in _bank(model).items()}
    out.write_bytes(with_digest(bank, {k: v for k, v in _metadata(model).items() if k != "digest"}))
    return out


def test_watch_checks_the_model_at_load_and_refuses_or_warns(model, synthetic_root, tmp_path, monkeypatch):
    """``watch`` recomputes the fingerprint on the probes when it loads the model: a changed default
    refuses it in one line naming the setting (nothing scored); ``--self-check warn`` scores, warning."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(next((synthetic_root / "disc" / "test").rglob("*.png")), folder / "part.png")
    tiny = config.PRESETS["tiny"]
    monkeypatch.setitem(config.PRESETS, "tiny",
                        dataclasses.replace(tiny, patchclip=dataclasses.replace(tiny.patchclip, temperature=0.2)))
    watch = ("watch", str(folder), "--model", str(model), "--settle", "0.1", "--poll", "0.1", "--once")
    refused = clipfusion_here(*watch, "--out", str(tmp_path / "a"))
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "does not score here as it did when its thresholds were set" in line
    assert "setting patchclip.temperature 0.07 -> 0.2" in line and "--self-check warn" in line
    assert not (tmp_path / "a" / "results.jsonl").exists()

    warned = clipfusion_here(*watch, "--out", str(tmp_path / "b"), "--self-check", "warn")
    assert warned.returncode == 0, warned.stderr
    assert "does not score here as it did" in warned.stderr
    assert len((tmp_path / "b" / "results.jsonl").read_text().splitlines()) == 1


def test_serve_refuses_a_model_whose_scores_changed(model, tmp_path):
    """A bank rewritten with a matching digest passes every integrity check but not the self-check: serve
    exits with one line before it listens."""
    rewritten = _rewritten_bank(model, tmp_path / "disc.cfm")
    done = clipfusion("serve", "--model", str(rewritten), "--data", str(tmp_path / "data"), "--host", "127.0.0.1",
                      "--port", "0")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "does not score here as it did when its thresholds were set (probe scores" in done.stderr
