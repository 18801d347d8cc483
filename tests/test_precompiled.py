"""Precompiled parts (``--precompiled``, ``clipfusion compile``): the UNet pass and the autoencoder
compiled ahead of time by torch's AOTInductor into a cache, built once, loaded by later processes.

Their maps are held to the eager path's (itself held to diffusers' full forward and a manual softmax
in test_encoders); a package is shown to be what ran by taking the eager code away; a package for
other settings, another precision or another torch is shown not to be used."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipfusion.cli import _runtime, build_parser
from clipfusion.config import MAP_NAMES, PRECOMPILED_CACHE_ENV, RuntimeConfig
from clipfusion.encoders import cache, diffusion
from clipfusion.encoders.digest import weights_digest
from clipfusion.errors import SettingError
from clipfusion.inspection import ModelFile
from clipfusion.methods.clipfusion.detector import CLIPFusion

from .commands import clipfusion, results

RELATIVE_TOLERANCE = 1e-4  # compiled kernels sum in another order: float32 rounding, far below this
FLOAT32 = RuntimeConfig("cpu", "float32")


def _relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / max(float(np.ptp(expected)), 1e-12))


@pytest.fixture(scope="module")
def built(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The ``model`` fixture's parts compiled by ``clipfusion compile`` (float32) into a cache folder of
    this module's: (the folder, the command's output)."""
    cache = tmp_path_factory.mktemp("compiled")
    done = clipfusion("compile", "--model", str(model), "--dtype", "float32", env={PRECOMPILED_CACHE_ENV: str(cache)})
    assert done.returncode == 0, done.stderr
    # the compiler's own log lines (dynamo's notes, inductor's, "No CUDA runtime is found" from building C++ on
    # a CPU-only machine) stay in clipfusion's debug log: every line is clipfusion's or a progress bar
    assert [line for line in done.stderr.splitlines() if not line.startswith("clipfusion: ")
            and "loading models" not in line] == []
    return cache, done.stdout


@pytest.fixture(autouse=True)
def fresh_encoders() -> None:
    """Each test's detectors get encoders of their own: a process shares one per runtime (and with it the
    packages it has looked up), which would carry one test's lookups into the next."""
    cache._diffusion_encoder.cache_clear()


def _detector(model: Path, mode: str) -> CLIPFusion:
    detector = ModelFile.open(model).detector(RuntimeConfig("cpu", "float32", precompiled=mode))
    assert isinstance(detector, CLIPFusion)
    return detector


def test_compile_builds_each_part_once_with_what_it_is_for(built, model):
    cache, output = built
    assert "compiled 2 of 2 parts" in output
    folders = sorted(path for path in cache.iterdir() if path.is_dir())
    assert [folder.name.split("-")[0] for folder in folders] == ["unet", "vae"]
    keys = {folder.name.split("-")[0]: json.loads((folder / "key.json").read_text()) for folder in folders}
    eager = _detector(model, "off")
    encoder = eager._branches()[1].encoder
    assert keys["unet"]["weights"] == weights_digest(encoder.unet)
    assert keys["vae"]["weights"] == weights_digest(encoder.vae)
    assert keys["unet"]["dtype"] == keys["vae"]["dtype"] == "float32"
    assert keys["unet"]["torch"] == torch.__version__
    # one image per call: the UNet's rows are one image's prompts, the autoencoder's one image
    assert keys["vae"]["inputs"][0][0][0] == 1
    assert all((folder / "package.pt2").stat().st_size > 0 for folder in folders)
    again = clipfusion("compile", "--model", str(model), "--dtype", "float32", "--quiet",
                       env={PRECOMPILED_CACHE_ENV: str(cache)})
    assert again.returncode == 0, again.stderr
    assert "found (built before) 2 parts" in again.stdout
    assert sorted(path for path in cache.iterdir() if path.is_dir()) == folders


def test_the_packages_give_the_eager_maps_and_are_what_runs(built, model, scenes, monkeypatch):
    cache, _ = built
    monkeypatch.setenv(PRECOMPILED_CACHE_ENV, str(cache))
    _, defective, _ = scenes
    eager = _detector(model, "off")
    expected = eager.encode(defective[:3], "disc")
    # the eager UNet pass and autoencoder taken away: only the packages can give maps now
    def gone(*args, **kwargs):
        raise AssertionError("the eager path ran")

    monkeypatch.setattr(diffusion, "partial_unet_forward", gone)
    monkeypatch.setattr(diffusion, "vae_latents", gone)
    precompiled = _detector(model, "auto")
    got = precompiled.encode(defective[:3], "disc")  # three images, one per call: a mix-up would show
    parts = precompiled.precompiled_parts()
    assert parts is not None and parts.missing == [] and len(parts.folders) == 2
    for name in ("clip_score", *MAP_NAMES):
        assert getattr(got, name).shape == getattr(expected, name).shape, name
        assert _relative_difference(getattr(got, name), getattr(expected, name)) <= RELATIVE_TOLERANCE, name


@pytest.mark.parametrize("change", ["torch", "read-out", "bfloat16"])
def test_a_package_for_another_torch_read_out_or_precision_is_not_used(built, model, scenes, monkeypatch, caplog,
                                                                        change):
    cache, _ = built
    monkeypatch.setenv(PRECOMPILED_CACHE_ENV, str(cache))
    dtype, overrides = "float32", {}
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "2.99.0")
    elif change == "read-out":  # other cross-attention layers: the UNet pass differs, the autoencoder not
        overrides = {"diffusion__cross_attn_places": ("up",)}
    else:
        dtype = "bfloat16"
    detectors = {}
    for mode in ("auto", "off"):
        detector = ModelFile.open(model).detector(RuntimeConfig("cpu", dtype, precompiled=mode))
        assert isinstance(detector, CLIPFusion)
        detectors[mode] = detector.set_params(**overrides)
    _, defective, _ = scenes
    with caplog.at_level(logging.DEBUG, logger="clipfusion"):
        got = detectors["auto"].encode(defective[:1], "disc")
    parts = detectors["auto"].precompiled_parts()
    assert parts is not None
    assert any("no precompiled unet" in record.getMessage() for record in caplog.records)
    status = parts.status("disc.cfm")
    assert status is not None and "unet eager" in status and "clipfusion compile --model disc.cfm" in status
    if change == "read-out":
        assert [name.split("-")[0] for name in parts.missing] == ["unet"]
        assert [folder.name.split("-")[0] for folder in parts.folders] == ["vae"]  # still fits: used
    else:
        assert len(parts.missing) == 2 and parts.folders == []  # nothing in the cache fits: eager
    expected = detectors["off"].encode(defective[:1], "disc")
    for name in MAP_NAMES:
        assert _relative_difference(getattr(got, name), getattr(expected, name)) <= RELATIVE_TOLERANCE, name


def test_a_damaged_package_is_said_and_its_part_runs_eager(built, model, scenes, tmp_path, monkeypatch, caplog):
    cache, _ = built
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    unet = next(path for path in copy.glob("unet-*") if path.is_dir())  # (beside it: its build's lock file)
    (unet / "package.pt2").write_bytes(b"half a package")  # a copy cut short, a disk error
    monkeypatch.setenv(PRECOMPILED_CACHE_ENV, str(copy))
    _, defective, _ = scenes
    precompiled, eager = _detector(model, "auto"), _detector(model, "off")
    with caplog.at_level(logging.WARNING, logger="clipfusion"):
        got = precompiled.encode(defective[:1], "disc")
    parts = precompiled.precompiled_parts()
    assert parts is not None and [folder.name.split("-")[0] for folder in parts.folders] == ["vae"]
    [warning] = [record.getMessage() for record in caplog.records if "cannot be used" in record.getMessage()]
    assert "precompiled unet" in warning and str(unet) in warning and "runs eager" in warning
    expected = eager.encode(defective[:1], "disc")
    for name in MAP_NAMES:
        assert _relative_difference(getattr(got, name), getattr(expected, name)) <= RELATIVE_TOLERANCE, name


def test_predict_with_precompiled_parts_scores_as_eager(built, model, synthetic_root, tmp_path):
    cache, _ = built
    images = synthetic_root / "disc" / "test" / "hole"
    env = {PRECOMPILED_CACHE_ENV: str(cache)}
    runs = {}
    for mode in ("off", "auto"):
        done = clipfusion("predict", str(images), "--model", str(model), "--out", str(tmp_path / mode), "--dtype",
                          "float32", "--precompiled", mode, "--quiet", env=env)
        assert done.returncode == 0, done.stderr
        runs[mode] = {row["path"]: row["score"] for row in results(tmp_path / mode)}
    assert runs["auto"].keys() == runs["off"].keys() and len(runs["off"]) == 2
    for path, score in runs["off"].items():
        assert runs["auto"][path] == pytest.approx(score, abs=1e-4)


def test_serve_and_watch_use_precompiled_parts_by_default_and_other_commands_ask():
    def runtime(*command: str) -> RuntimeConfig:
        return _runtime(build_parser().parse_args(list(command)))

    assert runtime("serve", "--model", "m.cfm").precompiled == "auto"
    assert runtime("watch", "in", "--model", "m.cfm", "--out", "o").precompiled == "auto"
    assert runtime("predict", "in", "--out", "o").precompiled == "off"
    assert runtime("predict", "in", "--out", "o", "--precompiled", "build").precompiled == "build"
    assert runtime("serve", "--model", "m.cfm", "--compile").precompiled == "off"  # --compile replaces it
    with pytest.raises(SettingError, match="give one of them"):
        RuntimeConfig(compile=True, precompiled="auto")


def test_compile_refuses_an_export_folder_in_one_line(tmp_path):
    done = clipfusion("compile", "--model", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "export folder" in done.stderr
