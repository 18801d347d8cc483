"""The command line as a user runs it: the installed ``clipfusion`` script, in a subprocess."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipfusion.evaluation.tables import METRICS


def clipfusion(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    script = Path(sys.executable).with_name("clipfusion")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clipfusion"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})


def test_evaluate_writes_the_three_files_and_resumes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", "mean-image",
            "--shots", "1", "--seeds", "0", "1", "--out", str(out), "--quiet"]
    first = clipfusion(*args)
    assert first.returncode == 0, first.stderr
    assert "| **mean** |" in first.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4 and set(METRICS) <= set(results["runs"][0])
    assert (out / "results.md").is_file() and (out / "per_image.csv").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "units").rglob("*.json")}

    second = clipfusion(*args)
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "units").rglob("*.json")} == stamps
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--root", "/no/such/folder"], "/no/such/folder does not exist"),
        (["--categories", "bottle"], "unknown category bottle"),
        (["--preset", "huge"], "invalid choice: 'huge' (choose from 'paper-recon', 'sd21', 'vitl14', 'fast', 'tiny')"),
        (["--set", "fusion__alpha=0.3"], "unknown setting 'fusion__alpha'"),
        (["--set", "patchclip__dense_mode=foo"], "patchclip__dense_mode must be one of vv, window, tile, raw"),
        (["--alpha", "1.5"], "fusion__alpha_seg must lie in [0, 1]"),
        (["--eval-size", "big"], "--eval-size must be a positive integer or 'native'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(synthetic_root, tmp_path, args, message):
    base = {"--root": str(synthetic_root)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    flat = [item for pair in base.items() for item in pair]
    result = clipfusion("evaluate", "--dataset", "mvtec", *flat, "--out", str(tmp_path / "o"), "--quiet",
                        "--method", "clipfusion" if {"--preset", "--set", "--alpha"} & set(base) else "mean-image")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path):
    result = clipfusion("evaluate", "--dataset", "mvtec", "--root", "/no/such/folder", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_explains_with_examples():
    result = clipfusion("evaluate", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--eval-size" in result.stdout and "skips" in result.stdout


def test_corrupt_file_is_reported_and_the_rest_is_scored(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "fabric", root / "fabric")
    (root / "fabric" / "test" / "good" / "000.png").write_text("garbage")
    result = clipfusion("evaluate", "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "o"),
                        "--method", "mean-image", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "000.png" in result.stderr
    assert json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]["n_images"] == 8


def test_demo_runs_every_method_on_generated_data(tmp_path):
    result = clipfusion("demo", "--out", str(tmp_path / "demo"), "--data", str(tmp_path / "data"), "--quiet",
                        env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert result.returncode == 0, result.stderr
    assert "MEANINGLESS" in result.stdout  # no real weights here: the tiny preset, said plainly
    for method in ("clipfusion", "winclip", "mean-image"):
        assert f"| {method} | 1 |" in result.stdout
        results = json.loads((tmp_path / "demo" / method / "results.json").read_text())
        assert {r["category"] for r in results["runs"]} == {"fabric", "marble", "disc", "plate", "capsule"}


@pytest.mark.parametrize("method", ["clipfusion", "winclip"])
def test_evaluate_runs_the_real_methods_with_the_tiny_preset(synthetic_root, tmp_path, method):
    out = tmp_path / method
    result = clipfusion("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", method,
                        "--preset", "tiny", "--shots", "0", "1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(r["category"], r["shots"]) for r in results["runs"]] == [
        ("disc", 0), ("disc", 1), ("fabric", 0), ("fabric", 1)]
    assert results["config"]["method_params"]["preset"] == "tiny"
    assert all(0 <= r["pixel_auroc"] <= 1 for r in results["runs"])


def test_ablation_flags_reach_the_detector(synthetic_root, tmp_path):
    out = tmp_path / "ablation"
    result = clipfusion("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--categories", "disc",
                        "--preset", "tiny", "--alpha", "0.2", "--timestep", "250",
                        "--set", 'fusion__maps=["clip_language", "diff_language"]', "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    params = json.loads((out / "results.json").read_text())["config"]["method_params"]
    assert params["fusion"]["alpha_seg"] == params["fusion"]["alpha_cls"] == 0.2
    assert params["diffusion"]["timestep"] == 250
    assert params["fusion"]["maps"] == ["clip_language", "diff_language"]


def test_missing_weights_offline_is_one_clear_line(synthetic_root, tmp_path):
    result = clipfusion("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--offline",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "weights for ViT-B-16-plus-240" in result.stderr and "network access" in result.stderr
    assert "Traceback" not in result.stderr


def test_synth_writes_an_mvtec_layout(tmp_path):
    result = clipfusion("synth", "--out", str(tmp_path / "s"), "--size", "48", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s" / "disc" / "ground_truth" / "hole" / "000_mask.png").is_file()


# --- predict, fit, sweep, report ------------------------------------------------------------------

def test_predict_folder_with_a_corrupt_file_writes_every_other_result(synthetic_root, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(synthetic_root / "disc" / "test" / "hole", folder / "hole")
    shutil.copytree(synthetic_root / "disc" / "test" / "good", folder / "good")
    (folder / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    result = clipfusion("predict", str(folder), "--category", "disc", "--preset", "tiny", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr
    summary = json.loads((out / "scores.json").read_text())
    assert len(summary["images"]) == 5 and [s["path"] for s in summary["skipped"]] == [str(folder / "good" /
                                                                                          "broken.png")]
    assert len(list((out / "overlays").glob("*.png"))) == 5 and len(list((out / "maps").glob("*.npy"))) == 5
    maps = [np.load(p) for p in sorted((out / "maps").glob("*.npy"))]
    assert summary["scale"] == pytest.approx([min(m.min() for m in maps), max(m.max() for m in maps)])
    with (out / "scores.csv").open() as handle:
        assert next(iter(csv.DictReader(handle))).keys() == {"path", "score", "decision", "seconds"}


def test_predict_few_shot_with_auto_threshold(synthetic_root, tmp_path):
    out = tmp_path / "out"
    result = clipfusion("predict", str(synthetic_root / "disc" / "test"), "--category", "disc", "--preset", "tiny",
                        "--normal", str(synthetic_root / "disc" / "train" / "good"), "--shots", "2",
                        "--threshold", "auto", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "scores.json").read_text())
    assert "held-out normal images" in summary["threshold"]["how"] and "2 held-out" in summary["threshold"]["how"]
    assert len(summary["references"]) == 2
    threshold = summary["threshold"]["value"]
    assert all(row["decision"] == ("anomalous" if row["score"] > threshold else "normal") for row in summary["images"])
    assert "flagged as anomalous" in result.stdout


def test_fit_then_predict_with_the_memory_bank_and_refuse_a_mismatch(synthetic_root, tmp_path):
    bank = tmp_path / "disc.safetensors"
    normal = str(synthetic_root / "disc" / "train" / "good")
    fitted = clipfusion("fit", "--normal", normal, "--category", "disc", "--shots", "2", "--preset", "tiny",
                        "--out", str(bank), "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    assert bank.is_file() and "2 references of disc" in fitted.stdout
    images = str(synthetic_root / "disc" / "test" / "hole")
    ok = clipfusion("predict", images, "--memory", str(bank), "--category", "disc", "--preset", "tiny",
                    "--out", str(tmp_path / "p"), "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads((tmp_path / "p" / "scores.json").read_text())["references"]) == 2
    wrong = clipfusion("predict", images, "--memory", str(bank), "--category", "disc", "--preset", "tiny",
                       "--timestep", "300", "--out", str(tmp_path / "q"), "--quiet")
    assert wrong.returncode == 2
    assert "timestep: bank 100 vs detector 300" in wrong.stderr and "Traceback" not in wrong.stderr


def test_sweep_writes_the_table_and_the_best_setting(synthetic_root, tmp_path):
    out = tmp_path / "sweep"
    result = clipfusion("sweep", "--dataset", "mvtec", "--root", str(synthetic_root), "--categories", "disc",
                        "--preset", "tiny", "--shots", "1", "--grid", "fusion__alpha_seg=0.2,0.8",
                        "--grid", "diffusion__timestep=50,150", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["rows"]) == 4 and len(sweep["summary"]) == 4
    assert sweep["best"] == max(sweep["summary"], key=lambda entry: entry["pixel_aupro"])
    assert "Best by AUPRO" in (out / "sweep.md").read_text()


def test_evaluate_writes_a_self_contained_report(synthetic_root, tmp_path):
    out = tmp_path / "run"
    result = clipfusion("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", "mean-image",
                        "--shots", "0", "1", "--seeds", "0", "1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = (out / "report.html").read_text()
    assert report.count("<table") >= 3  # 0-shot, 1-shot, thresholds
    assert "± " in report and "F1-max thresholds" in report
    assert report.count("data:image/jpeg;base64,") >= 8  # gallery: 2 categories × 2 shots × up to 4
    assert report.count("data:image/png;base64,") >= 5  # histograms, ROC curves, metric vs shots
    assert "src=\"http" not in report and "src=\"/" not in report  # nothing outside the file


def test_benchmark_writes_both_files_with_stage_split(tmp_path):
    out = tmp_path / "bench"
    result = clipfusion("benchmark", "--presets", "tiny", "--images", "2", "--repeats", "1", "--out", str(out),
                        "--quiet")
    assert result.returncode == 0, result.stderr
    bench = json.loads((out / "benchmark.json").read_text())
    assert {(r["method"], r["shots"], r["batch_size"]) for r in bench["runs"]} == {
        (m, k, b) for m in ("clipfusion", "winclip") for k in (0, 4) for b in (1, 8)}
    fused = next(r for r in bench["runs"] if r["method"] == "clipfusion" and r["shots"] == 4)
    assert {"clip", "vae", "unet", "maps", "memory", "fusion"} <= set(fused["stages"])
    assert sum(fused["stages"].values()) <= fused["ms_per_image"] * 1.05
    assert "tiny_4shot_memory_search_share" in bench["ratios"]
    assert "| clipfusion | tiny | 4 |" in (out / "benchmark.md").read_text()
