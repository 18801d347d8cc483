from __future__ import annotations

import subprocess
import sys

import clipfusion


def test_public_api_is_importable_from_the_package():
    from clipfusion import CLIPFusion, EvaluationRunner, Prediction, WinCLIP, get_preset, load_dataset

    assert CLIPFusion.__module__ == "clipfusion.methods.clipfusion.detector"
    assert {WinCLIP.__name__, Prediction.__name__, EvaluationRunner.__name__} == {
        "WinCLIP", "Prediction", "EvaluationRunner"}
    assert get_preset("tiny").name == "tiny" and callable(load_dataset)
    assert set(clipfusion.__all__) >= {"CLIPFusion", "Prediction", "load_dataset"}


def test_importing_the_package_does_not_load_torch():
    code = "import sys, clipfusion, clipfusion.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_cli_name_lists_match_the_registries():
    from clipfusion.config import DATASET_NAMES, METHOD_NAMES, PRESET_NAMES, PRESETS
    from clipfusion.data import DATASETS
    from clipfusion.methods.registry import METHODS

    assert tuple(METHODS) == METHOD_NAMES
    assert tuple(DATASETS) == DATASET_NAMES
    assert tuple(PRESETS) == PRESET_NAMES and "fast" in PRESET_NAMES


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_the_baselines_import_nothing_from_the_clipfusion_method():
    for baseline in ("clipfusion.methods.winclip", "clipfusion.methods.mean_image"):
        loaded = _modules_after_import(baseline)
        assert not {m for m in loaded if m.startswith("clipfusion.methods.clipfusion")}, baseline


def test_importing_the_report_does_not_choose_a_matplotlib_backend():
    code = ("import matplotlib; matplotlib.use('svg'); import clipfusion.evaluation.report, clipfusion.overlays; "
            "print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "svg"
