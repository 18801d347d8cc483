"""The bad-input and fault audit (issue 10): each defect reproduced, and what the user gets now.

Every case runs the installed command as a user would; files are made here, not shipped.
"""
from __future__ import annotations

import csv
import errno
import glob
import io
import json
import os
import pickle
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfusion.cli import main
from clipfusion.data.base import read_rgb
from clipfusion.errors import ClipfusionError
from clipfusion.run_folders import check_output_folder, exclusive
from clipfusion.tasks.inputs import _glob, collect_images

from .commands import clipfusion, clipfusion_here, results


def _strict_json(path: Path) -> object:
    def refuse(constant: str) -> object:
        raise AssertionError(f"{path} holds {constant}: not JSON")
    return json.loads(path.read_bytes(), parse_constant=refuse)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _evaluate(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return clipfusion("evaluate", "--dataset", "mvtec", "--root", str(root), "--method", "mean-image",
                      "--shots", "0", "1", "--out", str(out), "--quiet", *extra)


def _evaluate_here(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return clipfusion_here("evaluate", "--dataset", "mvtec", "--root", str(root), "--method", "mean-image",
                           "--shots", "0", "1", "--out", str(out), "--quiet", *extra)


# --- 1. --overwrite deletes only what clipfusion wrote ------------------------------------------

def test_overwrite_never_deletes_files_clipfusion_did_not_write(synthetic_root, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("four years of work")
    _one_line_error(_evaluate_here(synthetic_root, victim, "--overwrite"), "thesis.txt")
    assert (victim / "thesis.txt").read_text() == "four years of work"

    dataset = tmp_path / "ds"
    shutil.copytree(synthetic_root, dataset)
    before = _snapshot(dataset)
    _one_line_error(_evaluate_here(dataset, dataset, "--overwrite"), str(dataset))
    _one_line_error(_evaluate_here(dataset, tmp_path, "--overwrite"), "contains")  # an ancestor of the data
    assert _snapshot(dataset) == before


def test_a_half_written_file_of_the_runs_own_is_not_taken_for_a_strangers(tmp_path):
    # a run writing results.json atomically holds .results.json.XXXXXXXX.tmp for a moment: a second run that
    # checks the folder then must get the lock's "another run (process N)" error, not "holds a stranger's file"
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / ".results.json.k3j9x_2a.tmp").write_text("{")
    check_output_folder(out, "evaluation", ["results.json"])
    (out / ".notes.txt.k3j9x_2a.tmp").write_text("mine")  # not a temporary of the run's own files
    with pytest.raises(ClipfusionError, match=r"holds \.notes\.txt\.k3j9x_2a\.tmp, which this evaluation run"):
        check_output_folder(out, "evaluation", ["results.json"])


def test_overwrite_replaces_an_earlier_evaluation(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert _evaluate_here(synthetic_root, out).returncode == 0
    stale = out / "units" / "disc" / "k9_s9.json"
    stale.write_text("{}")
    assert _evaluate_here(synthetic_root, out, "--overwrite").returncode == 0
    assert not stale.exists() and (out / "results.json").is_file()


# --- 2. hostile category names --------------------------------------------------------------------

@pytest.mark.parametrize("category", ["../../../escaped", "/tmp/absolute-category", "..", "a/b"])
def test_category_names_cannot_escape_the_output_folder(tmp_path, category):
    root = tmp_path / "data"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(tmp_path / "img.png")
    (root / "a").mkdir(parents=True)
    shutil.copy(tmp_path / "img.png", root / "a" / "good.png")
    entry = {"cls_name": category, "specie_name": "good", "anomaly": 0, "mask_path": "", "img_path": "a/good.png"}
    (root / "meta.json").write_text(json.dumps({"train": {category: [entry]}, "test": {category: [entry]}}))
    before = _snapshot(tmp_path)
    result = clipfusion_here("evaluate", "--dataset", "meta", "--root", str(root), "--method", "mean-image",
                        "--out", str(tmp_path / "out" / "run"), "--quiet")
    _one_line_error(result, "cannot be a folder name")
    assert _snapshot(tmp_path) - before <= {"out"}  # at most the empty parent of --out, nothing else
    assert not Path("/tmp/absolute-category").exists()


# --- 3. file names that are not UTF-8 -----------------------------------------------------------------

def test_non_utf8_file_names_are_written_losslessly(synthetic_root, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(synthetic_root / "disc" / "test" / "good", folder)
    raw = os.fsencode(folder) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not valid UTF-8
    shutil.copy(next(folder.glob("*.png")), raw)
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(folder), "--category", "disc", "--preset", "tiny", "--threshold", "0.5",
                        "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    n_images = len(os.listdir(os.fsencode(folder)))
    scored = results(out)
    assert len(scored) == n_images
    assert raw in {os.fsencode(row["path"]) for row in scored}  # the exact bytes come back
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_bytes().decode("utf-8", "surrogateescape"))))
    assert len(rows) == n_images and raw in {os.fsencode(r["path"]) for r in rows}


def test_evaluation_with_a_non_utf8_test_image_completes(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "disc", root / "disc")
    good = root / "disc" / "test" / "good"
    shutil.copy(next(good.glob("*.png")), os.fsencode(good) + b"/\xff\xfe.png")
    out = tmp_path / "run"
    result = clipfusion_here("evaluate", "--dataset", "folder", "--root", str(root), "--method", "mean-image",
                        "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    per_image = (out / "per_image.csv").read_bytes().decode("utf-8", "surrogateescape").strip().splitlines()
    assert len(per_image) - 1 == _strict_json(out / "results.json")["runs"][0]["n_images"]
    assert b"\xff\xfe.png" in (out / "per_image.csv").read_bytes() and (out / "report.html").is_file()


# --- 4. huge images -------------------------------------------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width × height pixels (no pixel data): Pillow reads the size, then fails to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_images_above_the_pixel_limit_are_skipped_with_the_reason(synthetic_root, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(synthetic_root / "disc" / "test" / "good", folder)
    _png_header_only(folder / "huge.png", 20_000, 15_000)  # 300 MP: above Pillow's own bomb limit too
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(folder), "--category", "disc", "--preset", "tiny", "--out",
                             str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    skipped = _strict_json(out / "summary.json")["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["huge.png"]
    assert "300 megapixels" in skipped[0]["reason"] and "--max-pixels" in skipped[0]["reason"]
    small = clipfusion_here("predict", str(folder), "--category", "disc", "--preset", "tiny", "--out",
                            str(tmp_path / "o2"), "--max-pixels", "1000", "--quiet")
    _one_line_error(small, "none of the images could be scored")  # 96² = 9216 pixels each: all above 1000


# --- 5. repeated seeds and categories ----------------------------------------------------------------------

def test_repeated_seeds_and_categories_count_once(synthetic_root, tmp_path):
    out = tmp_path / "run"
    result = clipfusion_here("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", "mean-image",
                        "--shots", "1", "--seeds", "0", "0", "1", "--categories", "disc", "disc",
                        "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    runs = _strict_json(out / "results.json")["runs"]
    assert sorted((r["category"], r["seed"]) for r in runs) == [("disc", 0), ("disc", 1)]
    assert "repeated --seeds ignored" in result.stderr and "repeated categories ignored" in result.stderr


# --- 6. two runs into one folder ------------------------------------------------------------------------------

def test_a_second_run_into_a_locked_folder_names_the_holder(synthetic_root, tmp_path):
    out = tmp_path / "run"
    with exclusive(out):
        _one_line_error(_evaluate(synthetic_root, out), f"process {os.getpid()}")
    assert _evaluate(synthetic_root, out).returncode == 0  # the lock is released with the run


def test_two_concurrent_runs_into_one_folder_do_not_collide(synthetic_root, tmp_path):
    """A real run is frozen (SIGSTOP) while it holds the folder, so the second run surely meets it."""
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--preset", "tiny", "--shots", "0", "1",
            "--out", str(out), "--quiet"]
    script = Path(sys.executable).with_name("clipfusion")
    first = subprocess.Popen([str(script), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".clipfusion.pid").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    try:
        second = clipfusion(*args)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    _one_line_error(second, f"process {first.pid}")
    assert len(_strict_json(out / "results.json")["runs"]) == 4
    assert not list(out.rglob("*.tmp"))


# --- 7. NaN never becomes a decision -------------------------------------------------------------------------

def test_settings_and_inputs_that_would_give_nan_are_refused(synthetic_root, tmp_path):
    image = str(next((synthetic_root / "disc" / "test" / "good").glob("*.png")))
    base = ["predict", image, "--category", "disc", "--preset", "tiny", "--quiet"]
    _one_line_error(clipfusion_here(*base, "--set", "patchclip__temperature=0", "--out", str(tmp_path / "a")),
                    "patchclip__temperature must be > 0")
    _one_line_error(clipfusion_here(*base, "--threshold", "nan", "--out", str(tmp_path / "b")), "finite number")
    bank = tmp_path / "bank.safetensors"
    fitted = clipfusion_here("fit", "--normal", str(synthetic_root / "disc" / "train" / "good"), "--category", "disc",
                        "--shots", "2", "--preset", "tiny", "--out", str(bank), "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(bank), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(bank))
    tensors["clip/block-1"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    _one_line_error(clipfusion_here(*base, "--memory", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "c")),
                    "NaN")
    del tensors["diffusion/up1"]  # a bank with a layer missing (and no NaN left in the other one)
    tensors["clip/block-1"][0, 0] = 0.5
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=metadata)
    _one_line_error(clipfusion_here(*base, "--memory", str(tmp_path / "missing.safetensors"), "--out",
                                    str(tmp_path / "d")), "lacks the layers ['diffusion/up1']")


def test_predict_outputs_are_strict_json(synthetic_root, tmp_path):
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test" / "good"), "--category", "disc",
                        "--preset", "tiny", "--threshold", "0.5", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    _strict_json(out / "summary.json")
    assert all(row["decision"] == ("NG" if row["score"] > 0.5 else "OK") for row in results(out))


def test_predict_outputs_get_the_permissions_of_a_plain_write(synthetic_root, tmp_path):
    """Atomic writes go through mkstemp's 0600 files; the outputs must still be readable as the umask allows,
    like any file the user's tools write (the operating system's open() is the reference)."""
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--category", "disc", "--preset",
                             "tiny", "--threshold", "0.5", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    (tmp_path / "plain").write_text("x")
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    written = [path for path in out.rglob("*") if path.is_file()]
    assert {"results.csv", "summary.json", "index.html"} <= {path.name for path in written}
    assert {path.parent.name for path in written} >= {"maps", "overlays", "thumbnails"}
    assert {path.relative_to(out).as_posix(): path.stat().st_mode & 0o777 for path in written} == \
        {path.relative_to(out).as_posix(): plain for path in written}


def test_an_atomic_write_follows_the_umask_and_keeps_an_existing_files_mode(tmp_path):
    code = ("import os, sys\nfrom pathlib import Path\nfrom clipfusion.outputs import write_atomic\n"
            "folder = Path(sys.argv[1])\nwrite_atomic(folder / 'new.json', '{}')\n"
            "open(folder / 'plain.json', 'w').close()\n"
            "kept = folder / 'kept.json'\nkept.write_text('old')\nos.chmod(kept, 0o604)\nwrite_atomic(kept, 'new')\n"
            "names = ('new.json', 'plain.json', 'kept.json')\n"
            "print(' '.join(oct(os.stat(folder / name).st_mode & 0o777) for name in names))")
    run = subprocess.run(["sh", "-c", 'umask 027 && exec "$0" -c "$1" "$2"', sys.executable, code, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0o640", "0o640", "0o604"]
    assert (tmp_path / "kept.json").read_text() == "new"


# --- 9. predict leaves no stale files ----------------------------------------------------------------------------

def test_predict_refuses_a_folder_with_an_earlier_run_unless_overwrite(synthetic_root, tmp_path):
    out = tmp_path / "out"
    many, one = synthetic_root / "disc" / "test" / "good", synthetic_root / "disc" / "test" / "hole"
    base = ["predict", "--category", "disc", "--preset", "tiny", "--out", str(out), "--quiet"]
    assert clipfusion_here(*base[:1], str(many), *base[1:]).returncode == 0
    _one_line_error(clipfusion_here(*base[:1], str(one), *base[1:]), "--overwrite", "--resume")
    assert clipfusion_here(*base[:1], str(one), *base[1:], "--overwrite").returncode == 0
    assert len(list((out / "overlays").iterdir())) == len(list(one.iterdir()))  # no overlay of the first run
    foreign = tmp_path / "holiday"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"not ours")
    refused = clipfusion_here("predict", str(one), "--category", "disc", "--preset", "tiny", "--out", str(foreign),
                              "--overwrite", "--quiet")
    _one_line_error(refused, "beach.jpg")
    assert (foreign / "beach.jpg").read_bytes() == b"not ours"


# --- 10. resume across settings that cannot change results ----------------------------------------------------

def test_resume_ignores_batch_size_and_offline_and_names_only_real_differences(synthetic_root, tmp_path):
    out = tmp_path / "run"
    base = ["evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--preset", "tiny",
            "--categories", "disc", "--out", str(out), "--quiet"]
    assert clipfusion_here(*base, "--batch-size", "8").returncode == 0
    assert clipfusion_here(*base, "--batch-size", "3", "--offline").returncode == 0
    refused = clipfusion_here(*base, "--alpha", "0.3")
    _one_line_error(refused, "method_params.fusion.alpha_cls: 0.5 → 0.3", "method_params.fusion.alpha_seg")
    assert len(refused.stderr) < 600


# --- 11. folder link loops -----------------------------------------------------------------------------------------

def test_folder_link_loops_list_each_file_once_and_end(synthetic_root, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(synthetic_root / "disc" / "test" / "good", folder / "good")
    (folder / "good" / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "again").symlink_to(folder / "good", target_is_directory=True)
    expected = len(list((synthetic_root / "disc" / "test" / "good").glob("*.png")))
    assert len(collect_images([str(folder)])) == expected
    assert len(collect_images([f"{folder}/**/*.png"])) == expected


def test_glob_patterns_match_what_glob_glob_matches_on_a_plain_tree(tmp_path):
    for name in ("a.png", "b.jpg", "sub/c.png", "sub/deep/d.png", "sub/deep/e1.png", "x/y.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    for pattern in ("*.png", "**/*.png", "sub/**/*.png", "sub/*/*.png", "**/e?.png", "[ab].*", "sub/**", "x/[!z]*"):
        full = f"{tmp_path}/{pattern}"
        expected = sorted(p for p in glob.glob(full, recursive=True) if Path(p).is_file())
        assert sorted(str(p) for p in _glob(full)) == expected, pattern


# --- 12. EXIF orientation -----------------------------------------------------------------------------------------

def test_exif_orientation_is_applied_on_read(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = read_rgb(tmp_path / "rotated.jpg")
    assert upright.shape == (40, 20, 3)  # displayed orientation
    assert upright[:10].mean() > 200 and upright[-10:].mean() < 60  # the band is now on top


# --- 13. one-line errors instead of tracebacks --------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "needle"), [
    (["--device", "gpu"], "device must be auto, cpu, cuda, cuda:N or mps"),
    (["--set", "fusion__alpha_seg=abc"], "fusion__alpha_seg must be a number"),
    (["--set", "fusion__output_size=0"], "fusion__output_size must be >= 1"),
    (["--set", "diffusion__image_size=0"], "diffusion__image_size must be a positive multiple of 8"),
    (["--set", "patchclip__tile_grid=0"], "patchclip__tile_grid must be >= 1"),
    (["--set", "mapdiff__template=a {shape} photo"], "mapdiff__template may hold only"),
    (["--sigma", "-1"], "fusion__sigma must be >= 0"),
    (["--set", "fusion__topk_fraction=2"], "fusion__topk_fraction must lie in (0, 1]"),
    (["--seeds", "-1"], "--seeds must be >= 0"),
    (["--shots", "-2"], "--shots must be >= 0"),
])
def test_bad_settings_are_one_line_errors(synthetic_root, tmp_path, capsys, extra, needle):
    """In-process (the same ``main`` the command runs): these fail before any model loads."""
    code = main(["evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--preset", "tiny",
                 "--out", str(tmp_path / "o"), "--quiet", *extra])
    stderr = capsys.readouterr().err
    _one_line_error(subprocess.CompletedProcess([], code, "", stderr), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["predict", "fit", "calibrate"])
@pytest.mark.parametrize(("option", "value"), [("--batch-size", "0"), ("--batch-size", "-1"), ("--max-pixels", "0")])
def test_a_batch_size_or_pixel_limit_below_one_is_refused_at_once(model, synthetic_root, tmp_path, command, option,
                                                                   value):
    """Found when the command line is read: no model loads, nothing is written (was a ValueError traceback,
    'none of the images could be scored' with no message above it, or 'above the limit of -0')."""
    out = tmp_path / ("o.cfm" if command != "predict" else "o")
    normal = str(synthetic_root / "disc" / "train" / "good")
    given = {"predict": ["predict", str(synthetic_root / "disc" / "test"), "--model", str(model)],
             "fit": ["fit", "--normal", normal, "--category", "disc", "--shots", "1", "--preset", "tiny"],
             "calibrate": ["calibrate", "--model", str(model), "--normal", normal]}[command]
    result = clipfusion_here(*given, "--out", str(out), option, value, "--quiet")
    _one_line_error(result, f"argument {option}: must be >= 1, not {value}")
    assert not out.exists()


@pytest.mark.parametrize(("code", "advice"), [
    (errno.ENOSPC, "free space on that disk"),
    (errno.EACCES, "you may not write there"),
    (errno.EPERM, "the system does not permit it there"),
    (errno.EROFS, "that file system is read-only"),
])
def test_an_os_error_gets_advice_that_matches_it(monkeypatch, tmp_path, code, advice):
    """A full disk, a refused permission and a read-only mount each get their own advice (the audit got
    "free space" for "Operation not permitted").  As root no real permission error can be provoked, so the
    command itself raises what the operating system would."""
    from clipfusion import cli

    def refused(args):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "results.jsonl"))

    monkeypatch.setattr(cli, "_cmd_synth", refused)
    result = clipfusion_here("synth", "--out", str(tmp_path / "out"))
    _one_line_error(result, os.strerror(code), str(tmp_path / "out" / "results.jsonl"), advice)
    assert "free space" not in result.stderr or code == errno.ENOSPC


def test_bad_output_paths_are_one_line_errors(synthetic_root, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(_evaluate_here(synthetic_root, a_file), "is a file")
    _one_line_error(_evaluate_here(synthetic_root, Path("/proc/clipfusion-out")), "/proc/clipfusion-out")
    start = time.monotonic()
    fit = clipfusion_here("fit", "--normal", str(synthetic_root / "disc" / "train" / "good"), "--category", "disc",
                     "--shots", "2", "--preset", "tiny", "--out", str(tmp_path), "--quiet")
    _one_line_error(fit, "is a folder")
    assert time.monotonic() - start < 60


def test_damaged_run_files_and_banks_are_named(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert _evaluate_here(synthetic_root, out).returncode == 0
    unit = next((out / "units").rglob("k1_s0.json"))
    unit.write_text("{ truncated")
    _one_line_error(_evaluate_here(synthetic_root, out), str(unit))
    (out / "identity.json").write_text("[1, 2")
    _one_line_error(_evaluate_here(synthetic_root, out), "identity.json")

    import torch
    from safetensors.torch import save_file

    image = str(next((synthetic_root / "disc" / "test" / "good").glob("*.png")))
    base = ["predict", image, "--category", "disc", "--preset", "tiny", "--quiet"]
    save_file({"clip/block-1": torch.zeros(3, 4, 5)}, str(tmp_path / "shape.safetensors"), metadata={"manifest": "{}"})
    shape = clipfusion_here(*base, "--memory", str(tmp_path / "shape.safetensors"), "--out", str(tmp_path / "a"))
    _one_line_error(shape, "not (features, channels)")
    save_file({"x": torch.zeros(3, 4)}, str(tmp_path / "list.safetensors"), metadata={"manifest": "[1]"})
    listed = clipfusion_here(*base, "--memory", str(tmp_path / "list.safetensors"), "--out", str(tmp_path / "b"))
    _one_line_error(listed, "not a JSON object")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load on the planted file
def test_a_pickled_checkpoint_as_clip_weights_is_refused_in_one_line(synthetic_root, tmp_path):
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(pickle.dumps({"state_dict": Path("not/a/tensor")}))  # torch.load(weights_only) refuses it
    image = str(next((synthetic_root / "disc" / "test" / "good").glob("*.png")))
    result = clipfusion_here("predict", image, "--category", "disc", "--preset", "tiny", "--quiet",
                             "--set", "clip__model_name=ViT-B-32", "--set", f"clip__pretrained={checkpoint}",
                             "--out", str(tmp_path / "o"))
    _one_line_error(result, f"cannot load CLIP weights {checkpoint}")


# --- 14. kill -9 at random moments ---------------------------------------------------------------------------------

def _parse_outputs(out: Path) -> None:
    for path in out.rglob("*.json"):
        _strict_json(path)
    for path in out.rglob("*.csv"):
        list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8", "surrogateescape"))))


def test_kill_9_at_random_moments_never_leaves_a_broken_file(synthetic_root, tmp_path):
    reference = tmp_path / "reference"
    assert _evaluate_here(synthetic_root, reference, "--seeds", "0", "1").returncode == 0
    expected = _strict_json(reference / "results.json")["mean"]
    out = tmp_path / "killed"
    script = Path(sys.executable).with_name("clipfusion")
    args = [str(script), "evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", "mean-image",
            "--shots", "0", "1", "--seeds", "0", "1", "--out", str(out), "--quiet"]
    rng = random.Random(0)
    for _ in range(4):
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 3.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if out.exists():
            _parse_outputs(out)
    assert subprocess.run(args, capture_output=True, timeout=300).returncode == 0
    _parse_outputs(out)
    assert _strict_json(out / "results.json")["mean"] == expected


# --- 15. a model hub that never answers -----------------------------------------------------------------------------

def test_a_silent_model_hub_fails_fast_and_quietly(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    image = tmp_path / "part.png"
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(image)
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0"}
    start = time.monotonic()
    try:
        result = clipfusion("predict", str(image), "--category", "disc", "--hub-timeout", "2", "--quiet",
                            "--out", str(tmp_path / "o"), env=env)
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        server.close()
    elapsed = time.monotonic() - start
    _one_line_error(result, "weights for")
    assert elapsed < 60, elapsed
    assert "Retrying" not in result.stderr and "did not answer within 2 s" in result.stderr


@pytest.mark.parametrize("command", ["predict", "fit", "calibrate", "evaluate"])
def test_an_out_that_cannot_be_written_is_found_before_any_model_loads(command, model, synthetic_root, monkeypatch):
    """/sys refuses new files even to root: a real EACCES.  The probe (a file created and removed) finds it
    before a model is built (building one fails this test), with the advice for a permission."""
    from clipfusion.methods.clipfusion.detector import CLIPFusion

    def no_models(self):
        raise AssertionError("a model was built before --out was checked")

    monkeypatch.setattr(CLIPFusion, "_branches", no_models)
    normal = str(synthetic_root / "disc" / "train" / "good")
    given = {"predict": ["predict", str(synthetic_root / "disc" / "test"), "--model", str(model), "--out",
                         "/sys/clipfusion-out"],
             "fit": ["fit", "--normal", normal, "--category", "disc", "--shots", "1", "--preset", "tiny", "--out",
                     "/sys/clipfusion-out/disc.cfm"],
             "calibrate": ["calibrate", "--model", str(model), "--normal", normal, "--out", "/sys/clipfusion.cfm"],
             "evaluate": ["evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--preset", "tiny",
                          "--out", "/sys/clipfusion-out"]}[command]
    result = clipfusion_here(*given, "--quiet")
    _one_line_error(result, "cannot write in /sys", "you may not write there")
