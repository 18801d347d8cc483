"""predict, fit, sweep and benchmark as a user runs them: the installed ``clipfusion`` script, in a subprocess."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from .commands import clipfusion_here, results


def test_predict_folder_with_a_corrupt_file_writes_every_other_result(synthetic_root, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(synthetic_root / "disc" / "test" / "hole", folder / "hole")
    shutil.copytree(synthetic_root / "disc" / "test" / "good", folder / "good")
    (folder / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(folder), "--category", "disc", "--preset", "tiny", "--out", str(out),
                             "--quiet")
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 5 and [s["path"] for s in summary["skipped"]] == [str(folder / "good" /
                                                                                     "broken.png")]
    assert len(list((out / "overlays").glob("*.png"))) == 5 and len(list((out / "maps").glob("*.npy"))) == 5
    rows = results(out)
    assert {row["decision"] for row in rows} == {"no threshold"} and all(row["regions"] is None for row in rows)
    assert summary["identity"]["scale"] == [0.0, 1.0]  # no thresholds: the language maps' probability range
    with (out / "results.csv").open() as handle:
        assert [r["path"] for r in csv.DictReader(handle)] == [r["path"] for r in rows]


def test_predict_few_shot_with_auto_threshold(synthetic_root, tmp_path):
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--category", "disc", "--preset", "tiny",
                        "--normal", str(synthetic_root / "disc" / "train" / "good"), "--shots", "2",
                        "--threshold", "auto", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "derived in this run" in summary["how"] and "over 2 held-out" in summary["how"]
    assert len(summary["references"]) == 2
    threshold = summary["identity"]["image_threshold"]
    assert all(row["decision"] == ("NG" if row["score"] > threshold else "OK") for row in results(out))
    assert f"{summary['NG']} NG at image threshold" in result.stdout


def test_fit_then_predict_with_the_memory_bank_and_refuse_a_mismatch(synthetic_root, tmp_path):
    bank = tmp_path / "disc.safetensors"
    normal = str(synthetic_root / "disc" / "train" / "good")
    fitted = clipfusion_here("fit", "--normal", normal, "--category", "disc", "--shots", "2", "--preset", "tiny",
                        "--out", str(bank), "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    assert bank.is_file() and "2 references of disc" in fitted.stdout
    images = str(synthetic_root / "disc" / "test" / "hole")
    ok = clipfusion_here("predict", images, "--memory", str(bank), "--category", "disc", "--preset", "tiny",
                    "--out", str(tmp_path / "p"), "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads((tmp_path / "p" / "summary.json").read_text())["references"]) == 2
    wrong = clipfusion_here("predict", images, "--memory", str(bank), "--category", "disc", "--preset", "tiny",
                       "--timestep", "300", "--out", str(tmp_path / "q"), "--quiet")
    assert wrong.returncode == 2
    assert "timestep: bank 100 vs detector 300" in wrong.stderr and "Traceback" not in wrong.stderr


def test_sweep_writes_the_table_and_the_best_setting(synthetic_root, tmp_path):
    out = tmp_path / "sweep"
    result = clipfusion_here("sweep", "--dataset", "mvtec", "--root", str(synthetic_root), "--categories", "disc",
                        "--preset", "tiny", "--shots", "1", "--grid", "fusion__alpha_seg=0.2,0.8",
                        "--grid", "diffusion__timestep=50,150", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["rows"]) == 4 and len(sweep["summary"]) == 4
    assert sweep["best"] == max(sweep["summary"], key=lambda entry: entry["pixel_aupro"])
    assert "Best by AUPRO" in (out / "sweep.md").read_text()


def test_benchmark_ratios_compare_like_with_like():
    """Each ratio divides two rows of the same batch size (and shots, for compiled vs eager)."""
    from clipfusion.tasks.benchmark import _ratios

    def row(method: str, batch: int, ms: float) -> dict:
        return {"method": method, "preset": "fast", "shots": 0, "batch_size": batch, "ms_per_image": ms,
                "stages": {}}

    runs = [row("winclip", 1, 8000.0), row("winclip", 8, 7600.0), row("clipfusion", 1, 4000.0),
            row("clipfusion", 8, 3800.0), row("clipfusion-compiled", 1, 2500.0), row("clipfusion-compiled", 8, 1900.0)]
    assert _ratios(runs) == {
        "fast_vs_winclip_zero_shot": 2.0, "fast_compiled_vs_winclip_zero_shot": 3.2,
        "fast_vs_winclip_zero_shot_batch8": 2.0, "fast_compiled_vs_winclip_zero_shot_batch8": 4.0,
        "fast_0shot_batch1_compiled_vs_eager": 1.6, "fast_0shot_batch8_compiled_vs_eager": 2.0}


def test_benchmark_writes_both_files_with_stage_split(tmp_path):
    out = tmp_path / "bench"
    result = clipfusion_here("benchmark", "--presets", "tiny", "--images", "2", "--repeats", "1", "--out", str(out),
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
    machine = bench["machine"]  # every figure names the CPU it came from (read here independently)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert machine["cpu"] in cpuinfo and machine["cpus"] == os.cpu_count()
    flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":")[1].split())
    assert set(machine["cpu_flags"]) == flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"}
    assert machine["torch_cpu"]["capability"] in ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16", "AMX")



def test_sweep_selects_on_some_categories_and_reports_on_the_others(synthetic_root, tmp_path):
    out = tmp_path / "sweep"
    result = clipfusion_here("sweep", "--dataset", "mvtec", "--root", str(synthetic_root), "--preset", "tiny",
                        "--shots", "1", "--select-on", "disc", "--grid", "fusion__alpha_seg=0.1,0.9",
                        "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "same test images" not in result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["selected_on"] == ["disc"] and sweep["held_out"]["categories"] == ["fabric"]
    disc_rows = [r for r in sweep["rows"] if r["category"] == "disc"]
    best_on_disc = max(disc_rows, key=lambda r: r["pixel_aupro"])["setting"]
    assert sweep["best"]["setting"] == best_on_disc  # chosen on disc alone
    fabric = next(r for r in sweep["rows"] if r["category"] == "fabric" and r["setting"] == best_on_disc)
    assert sweep["held_out"]["pixel_aupro"] == pytest.approx(fabric["pixel_aupro"])  # reported on fabric
    assert "held-out categories ['fabric']" in (out / "sweep.md").read_text()
    same = clipfusion_here("sweep", "--dataset", "mvtec", "--root", str(synthetic_root), "--preset", "tiny",
                      "--categories", "disc", "--grid", "fusion__alpha_seg=0.5", "--out", str(tmp_path / "s2"))
    assert same.returncode == 0 and "selected and reported on the same test images" in same.stderr
    assert "optimistic" in (tmp_path / "s2" / "sweep.md").read_text()
    every = clipfusion_here("sweep", "--dataset", "mvtec", "--root", str(synthetic_root), "--preset", "tiny",
                       "--select-on", "disc", "fabric", "--grid", "fusion__alpha_seg=0.5",
                       "--out", str(tmp_path / "s3"))
    assert every.returncode == 2 and "--select-on names every category" in every.stderr


def test_memory_bank_references_are_not_held_out_for_the_threshold(synthetic_root, tmp_path):
    normal = synthetic_root / "disc" / "train" / "good"  # 4 images in the test dataset
    bank = tmp_path / "bank.safetensors"
    assert clipfusion_here("fit", "--normal", str(normal), "--category", "disc", "--shots", "3", "--preset", "tiny",
                           "--out", str(bank), "--quiet").returncode == 0
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test" / "hole"), "--category", "disc",
                             "--preset", "tiny", "--memory", str(bank), "--normal", str(normal),
                             "--threshold", "auto", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "over 1 held-out normal images" in json.loads((out / "summary.json").read_text())["how"]


def test_shots_without_a_folder_of_normals_is_an_error(synthetic_root, tmp_path):
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test" / "hole"), "--category", "disc",
                             "--preset", "tiny", "--shots", "2", "--out", str(tmp_path / "o"), "--quiet")
    assert result.returncode == 2 and "--shots 2 needs --normal DIR" in result.stderr
    assert not (tmp_path / "o").exists()


def test_auto_device_and_dtype(monkeypatch):
    import torch

    from clipfusion.hardware import CpuInfo, auto_device_dtype, slow_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_device_dtype("auto", "auto") == ("cuda", "float16")
    assert auto_device_dtype("auto", "float32") == ("cuda", "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    avx2 = CpuInfo("AMD EPYC", 2, ("avx2",))
    amx = CpuInfo("Intel Xeon 8481C", 4, ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    assert auto_device_dtype("auto", "auto", avx2) == ("cpu", "float32")
    assert auto_device_dtype("auto", "auto", amx) == ("cpu", "bfloat16")  # native bf16: 2x float32 there
    assert auto_device_dtype("auto", "float32", amx) == ("cpu", "float32")  # fp32 stays selectable
    assert auto_device_dtype("cuda:1", "auto") == ("cuda:1", "float16")
    assert [slow_on_cpu(d, avx2) for d in ("float32", "bfloat16", "float16")] == [False, True, True]
    assert [slow_on_cpu(d, amx) for d in ("float32", "bfloat16", "float16")] == [False, False, True]
