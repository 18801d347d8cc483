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
