"""The command line as a user runs it: the installed ``clipfusion`` script in a subprocess for the README's demo,
``--debug`` and ``--help``; ``cli.main`` in this process where the subject is a file or a message (each new
process pays seconds of imports)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipfusion.evaluation.tables import METRICS

from .commands import clipfusion, clipfusion_here


def test_evaluate_writes_the_three_files_and_resumes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = ["evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", "mean-image",
            "--shots", "1", "--seeds", "0", "1", "--out", str(out), "--quiet"]
    first = clipfusion_here(*args)
    assert first.returncode == 0, first.stderr
    assert "| **mean** |" in first.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4 and set(METRICS) <= set(results["runs"][0])
    assert (out / "results.md").is_file() and (out / "per_image.csv").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "units").rglob("*.json")}

    second = clipfusion_here(*args)
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
    result = clipfusion_here("evaluate", "--dataset", "mvtec", *flat, "--out", str(tmp_path / "o"), "--quiet",
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
    result = clipfusion_here("evaluate", "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "o"),
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
    result = clipfusion_here("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", method,
                        "--preset", "tiny", "--shots", "0", "1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(r["category"], r["shots"]) for r in results["runs"]] == [
        ("disc", 0), ("disc", 1), ("fabric", 0), ("fabric", 1)]
    assert results["config"]["method_params"]["preset"] == "tiny"
    assert all(0 <= r["pixel_auroc"] <= 1 for r in results["runs"])


def test_ablation_flags_reach_the_detector(synthetic_root, tmp_path):
    out = tmp_path / "ablation"
    result = clipfusion_here("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--categories", "disc",
                        "--preset", "tiny", "--alpha", "0.2", "--timestep", "250",
                        "--set", 'fusion__maps=["clip_language", "diff_language"]', "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    params = json.loads((out / "results.json").read_text())["config"]["method_params"]
    assert params["fusion"]["alpha_seg"] == params["fusion"]["alpha_cls"] == 0.2
    assert params["diffusion"]["timestep"] == 250
    assert params["fusion"]["maps"] == ["clip_language", "diff_language"]


def test_missing_weights_offline_is_one_clear_line(synthetic_root, tmp_path):
    result = clipfusion_here("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--offline",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "weights for ViT-B-16-plus-240" in result.stderr and "network access" in result.stderr
    assert "Traceback" not in result.stderr


def test_synth_writes_an_mvtec_layout(tmp_path):
    result = clipfusion_here("synth", "--out", str(tmp_path / "s"), "--size", "48", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s" / "disc" / "ground_truth" / "hole" / "000_mask.png").is_file()


def test_evaluate_writes_a_self_contained_report(synthetic_root, tmp_path):
    out = tmp_path / "run"
    result = clipfusion_here("evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--method", "mean-image",
                        "--shots", "0", "1", "--seeds", "0", "1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = (out / "report.html").read_text()
    assert report.count("<table") >= 3  # 0-shot, 1-shot, thresholds
    assert "± " in report and "F1-max thresholds" in report
    assert report.count("data:image/jpeg;base64,") >= 8  # gallery: 2 categories × 2 shots × up to 4
    assert report.count("data:image/png;base64,") >= 5  # histograms, ROC curves, metric vs shots
    assert "src=\"http" not in report and "src=\"/" not in report  # nothing outside the file


def test_the_readme_presets_table_is_generated_from_the_registry():
    from clipfusion.config import PRESET_NAMES, presets_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert presets_markdown() in readme, "run: python scripts/update_readme.py"
    assert all(f"| `{name}`" in presets_markdown() for name in PRESET_NAMES)  # fast and tiny included


def test_the_readme_first_screen_gets_a_newcomer_to_a_verdict():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    first_screen = "\n".join(readme[:45])
    for needle in ("clipfusion fit --normal", "clipfusion predict new_parts/ --model bottle.cfm", "index.html",
                   "--resume", "--preset tiny"):
        assert needle in first_screen, needle


def test_commands_report_mistakes_before_a_model_loads_or_ray_starts(synthetic_root, model, tmp_path):
    """A mistyped path, a refused --out or a bad --threshold is a one-line error within the imports' seconds:
    no model package or Ray is imported first (a real model takes a minute to load, Ray seconds to start),
    and nothing is written."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "run.json").write_text("{}")
    (earlier / "results.jsonl").write_text('{"path": "/x.png"}\n')  # a run with a row (one with none starts afresh)
    good, normal = synthetic_root / "disc" / "test" / "good", synthetic_root / "disc" / "train" / "good"
    tiny = ["--category", "disc", "--preset", "tiny", "--quiet"]
    cases = [
        (["predict", str(tmp_path / "typo"), "--out", str(tmp_path / "a"), *tiny], "no image files found at"),
        (["predict", str(tmp_path / "typo"), "--out", str(tmp_path / "b"), "--engine", "ray", *tiny],
         "no image files found at"),
        (["predict", str(tmp_path / "typo"), "--model", str(model), "--out", str(tmp_path / "c"), "--quiet"],
         "no image files found at"),
        (["predict", str(good), "--out", str(earlier), *tiny], "holds an earlier predict run"),
        (["predict", str(good), "--normal", str(normal), "--shots", "1", "--threshold", "0.x5",
          "--out", str(tmp_path / "d"), *tiny], "--threshold must be a finite number"),
        (["predict", str(good), "--threshold", "auto", "--out", str(tmp_path / "e"), *tiny],
         "--threshold auto needs --normal"),
        (["predict", str(good), "--memory", str(tmp_path / "no.safetensors"), "--out", str(tmp_path / "f"), *tiny],
         "no.safetensors not found"),
        (["predict", str(good), "--normal", str(tmp_path / "typo"), "--shots", "1", "--out", str(tmp_path / "g"),
          *tiny], "no image files found at"),
        (["fit", "--normal", str(tmp_path / "typo"), "--shots", "1", "--out", str(tmp_path / "h.cfm"), *tiny],
         "no image files found at"),
        (["fit", "--normal", str(normal), "--shots", "1", "--out", str(earlier), *tiny], "is a folder"),
        (["serve", "--model", str(tmp_path / "typo.cfm"), "--data", str(tmp_path / "i"), "--quiet"],
         "is neither a model file nor an export folder"),
        (["export", "--model", str(tmp_path / "typo.cfm"), "--out", str(tmp_path / "j"), "--quiet"],
         "typo.cfm not found"),
    ]
    code = ("import contextlib, io, json, sys\nfrom clipfusion.cli import main\nout = []\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        out.append([main(args), err.getvalue()])\n"
            "heavy = ('torch', 'diffusers', 'open_clip', 'transformers', 'ray', 'uvicorn', 'openvino')\n"
            "out.append(sorted(m for m in heavy if m in sys.modules))\n"
            "print(json.dumps(out))")
    run = subprocess.run([sys.executable, "-c", code, json.dumps([args for args, _ in cases])], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    *outcomes, imported = json.loads(run.stdout.strip().splitlines()[-1])
    for (args, message), (code_, stderr) in zip(cases, outcomes, strict=True):
        assert code_ == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, (args, stderr)
    assert imported == []
    assert [path.name for path in tmp_path.iterdir()] == ["earlier"]  # no --out was made
    assert sorted(path.name for path in earlier.iterdir()) == ["results.jsonl", "run.json"]


def test_the_mean_image_baseline_does_not_load_the_models_packages(synthetic_root, tmp_path):
    """Methods are imported when first used and ``--device auto`` is resolved when a model needs it: the
    baseline is spared torch's, open_clip's and diffusers' imports, about 10 s a process on 2 cores."""
    args = ["evaluate", "--dataset", "mvtec", "--root", str(synthetic_root), "--categories", "disc", "--method",
            "mean-image", "--out", str(tmp_path / "o"), "--quiet"]
    code = ("import sys\nfrom clipfusion.cli import main\ncode = main(sys.argv[1:])\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'open_clip', 'transformers') if m in sys.modules))\n"
            "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]["category"] == "disc"


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_keeps_other_packages_warnings_off_the_terminal(quiet, monkeypatch, capsys):
    """Under --quiet a warning raised in another package (diffusers' casting notes, say) goes to the log at
    debug level; clipfusion's own warnings still show.  Without --quiet both show."""
    import logging
    import warnings

    from clipfusion import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logging.getLogger("clipfusion"), "handlers", [])
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "warning")
    cli._configure_output(quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("weights kept in float32", UserWarning, "/site-packages/diffusers/modeling_utils.py", 7)
        warnings.warn_explicit("AUROC is undefined", UserWarning, str(Path(cli.__file__).parent / "evaluation" /
                                                                      "metrics.py"), 38)
    said = capsys.readouterr().err
    assert "AUROC is undefined" in said
    assert ("weights kept in float32" in said) is not quiet
    diffusers = logging.getLogger("diffusers")
    assert diffusers.getEffectiveLevel() == (logging.ERROR if quiet else logging.WARNING)
    for name in cli.THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
