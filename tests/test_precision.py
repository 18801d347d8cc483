"""One precision policy everywhere: what ``auto`` means, the precision a model file records and runs in,
``clipfusion calibrate``, and the switch that lets one machine decide as either CPU kind would."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipfusion.config import RuntimeConfig
from clipfusion.data import read_rgb
from clipfusion.errors import ClipfusionError
from clipfusion.hardware import BF16_SCORE_TOLERANCE, CpuInfo, cpu_info, forced_bf16, model_precision
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.clipfusion.model_file import read_card

from .commands import clipfusion_here, results

AVX2 = CpuInfo("AMD EPYC", 2, ("avx2",))
BF16 = CpuInfo("AMD EPYC", 2, ("avx2", "avx512f", "avx512_bf16"))


def test_the_switch_decides_as_if_the_cpu_had_or_lacked_native_bf16(monkeypatch):
    monkeypatch.delenv("CLIPFUSION_NATIVE_BF16", raising=False)
    assert forced_bf16() is None and cpu_info().forced_bf16 is None
    for value, native in (("1", True), ("0", False)):
        monkeypatch.setenv("CLIPFUSION_NATIVE_BF16", value)
        here = cpu_info()
        assert (forced_bf16(), here.native_bf16) == (native, native)
        assert here.flags == cpu_info().flags  # the flags stay the CPU's own: only the decisions change
        assert RuntimeConfig("cpu").resolved()[0].dtype == ("bfloat16" if native else "float32")
    assert CpuInfo("x", 1, ("avx512_bf16",), forced_bf16=False).native_bf16 is False
    assert CpuInfo("x", 1, ("avx2",), forced_bf16=True).native_bf16 is True
    monkeypatch.setenv("CLIPFUSION_NATIVE_BF16", "yes")
    with pytest.raises(ClipfusionError, match="CLIPFUSION_NATIVE_BF16='yes': set it to 1"):
        cpu_info()


@pytest.mark.parametrize(("asked", "recorded", "cpu", "expected"), [
    # no model file: auto is the command line's default
    ("auto", None, AVX2, ("float32", None)),
    ("auto", None, BF16, ("bfloat16", None)),
    ("float32", None, BF16, ("float32", None)),
    # a model file runs in its own precision where the CPU computes it natively...
    ("auto", "bfloat16", BF16, ("bfloat16", None)),
    ("auto", "float32", BF16, ("float32", None)),
    ("auto", "float32", AVX2, ("float32", None)),
    # ...otherwise in float32, and says why
    ("auto", "bfloat16", AVX2, ("float32", "derived in bfloat16 and this CPU lacks native bfloat16")),
    ("auto", "float16", BF16, ("float32", "derived in float16 and cpu does not compute float16 natively")),
    # a precision asked for is kept, and the difference said
    ("float32", "bfloat16", BF16, ("float32", "derived in bfloat16: running in float32, as asked")),
    ("bfloat16", "bfloat16", AVX2, ("bfloat16", None)),
])
def test_the_precision_a_model_runs_in(asked, recorded, cpu, expected):
    device, dtype, reason = model_precision("cpu", asked, recorded, cpu)
    assert (device, dtype) == ("cpu", expected[0])
    assert reason is None if expected[1] is None else expected[1] in reason


def test_a_model_runs_in_its_own_precision_where_it_can_and_says_what_changed_where_not(
        cpu_kind, model_fitted_as, synthetic_root, warnings_said):
    fitted_bf16, fitted_fp32 = model_fitted_as("1"), model_fitted_as("0")
    assert (read_card(fitted_bf16).dtype, read_card(fitted_fp32).dtype) == ("bfloat16", "float32")
    queries = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[:4]
    normal = synthetic_root / "disc" / "train" / "good"
    references = [read_rgb(normal / r["name"]) for r in read_card(fitted_bf16).references]
    # computed independently: a detector of the same settings and references, in an explicit precision
    expected = {dtype: CLIPFusion("tiny", RuntimeConfig("cpu", dtype), fusion__sigma=2).fit(references, "disc")
                .predict(queries, "disc").scores for dtype in ("float32", "bfloat16")}
    float32_model = CLIPFusion.load(fitted_fp32)
    assert float32_model.precision == "float32"  # on either CPU kind: float32 is native everywhere
    np.testing.assert_array_equal(float32_model.predict(queries, "disc").scores, expected["float32"])
    assert warnings_said() == []
    runs = "bfloat16" if cpu_kind == "1" else "float32"
    bfloat16_model = CLIPFusion.load(fitted_bf16)
    assert bfloat16_model.precision == runs
    # its bank was computed in bfloat16: the same file asked to run in that precision explicitly
    asked = CLIPFusion.load(fitted_bf16, RuntimeConfig("cpu", runs)).predict(queries, "disc").scores
    np.testing.assert_array_equal(bfloat16_model.predict(queries, "disc").scores, asked)
    CLIPFusion.load(fitted_bf16).predict(queries[:1], "disc")  # a second load: nothing said again
    said = warnings_said()
    if cpu_kind == "1":
        assert said == []
    else:
        assert len(said) == 1 and str(fitted_bf16) in said[0] and "derived in bfloat16" in said[0]
        assert "running in float32" in said[0] and "clipfusion calibrate" in said[0]
    # the documented tolerance holds between the precisions: scores and the thresholds derived from them
    assert np.abs(expected["bfloat16"] - expected["float32"]).max() <= BF16_SCORE_TOLERANCE
    image = [read_card(path).thresholds.image for path in (fitted_bf16, fitted_fp32)]
    assert abs(image[0] - image[1]) <= BF16_SCORE_TOLERANCE


def test_calibrate_derives_the_thresholds_again_in_this_machines_precision(monkeypatch, model_fitted_as,
                                                                            synthetic_root, tmp_path):
    monkeypatch.setenv("CLIPFUSION_NATIVE_BF16", "0")  # a machine without native bf16 ...
    fitted_bf16 = model_fitted_as("1")  # ... given a model fitted on one with it
    normal = tmp_path / "normal"
    shutil.copytree(synthetic_root / "disc" / "train" / "good", normal)
    for reference in read_card(fitted_bf16).references:  # renamed: the references are recognised by content
        (normal / reference["name"]).rename(normal / f"renamed-{reference['name']}")
    out = tmp_path / "here.cfm"
    done = clipfusion_here("calibrate", "--model", str(fitted_bf16), "--normal", str(normal), "--out", str(out))
    assert done.returncode == 0, done.stderr
    source, calibrated = read_card(fitted_bf16), read_card(out)
    assert (calibrated.dtype, calibrated.device) == ("float32", "cpu")
    assert "derived in float32 from 2 normal images" in done.stdout
    # recomputed here: the model run in float32 on the normal images that are not its references
    held_out = sorted(p for p in normal.iterdir() if not p.name.startswith("renamed-"))
    prediction = CLIPFusion.load(fitted_bf16, RuntimeConfig("cpu", "float32")).predict(held_out, "disc")
    assert calibrated.thresholds.n_normals == 2
    assert calibrated.thresholds.image == pytest.approx(float(np.quantile(prediction.scores, 0.99, method="higher")))
    assert calibrated.thresholds.pixel == pytest.approx(float(np.quantile(prediction.maps, 0.999, method="higher")))
    assert calibrated.thresholds.image != source.thresholds.image
    assert (calibrated.references, calibrated.preset, calibrated.overrides) == \
        (source.references, source.preset, source.overrides)
    kept, bank = load_file(str(out)), load_file(str(fitted_bf16))
    assert kept.keys() == bank.keys() and all(kept[k].equal(bank[k]) for k in bank)  # the bank is unchanged
    assert CLIPFusion.load(out).precision == "float32"

    only_references = tmp_path / "references"
    only_references.mkdir()
    for reference in source.references:
        shutil.copy(normal / f"renamed-{reference['name']}", only_references / reference["name"])
    refused = clipfusion_here("calibrate", "--model", str(fitted_bf16), "--normal", str(only_references),
                              "--out", str(tmp_path / "none.cfm"))
    assert refused.returncode == 2 and "holds only the model's references" in refused.stderr
    wrong = clipfusion_here("calibrate", "--model", str(fitted_bf16), "--normal", str(normal), "--out",
                            str(tmp_path / "x.safetensors"))
    assert wrong.returncode == 2 and "must be a model file (.cfm)" in wrong.stderr
    assert not (tmp_path / "none.cfm").exists() and not (tmp_path / "x.safetensors").exists()


def test_a_model_file_of_format_2_loads_as_float32_and_says_so_once(model, tmp_path, monkeypatch, warnings_said):
    monkeypatch.setenv("CLIPFUSION_NATIVE_BF16", "1")  # where auto would otherwise run bfloat16
    with safe_open(str(model), framework="pt") as handle:
        metadata = dict(handle.metadata())
    card = json.loads(metadata["model"])
    del card["dtype"], card["device"], metadata["digest"]  # what clipfusion wrote before format 3
    metadata.update(model=json.dumps(card), format="clipfusion-model/2")
    old = tmp_path / "old.cfm"
    save_file(load_file(str(model)), str(old), metadata=metadata)
    assert (read_card(old).dtype, read_card(old).device) == ("float32", "cpu")
    assert CLIPFusion.load(old).precision == "float32"
    said = warnings_said()
    assert len(said) == 1 and "format clipfusion-model/2" in said[0] and "taken as float32" in said[0]
    assert "nor a digest" in said[0]


def test_resume_refuses_a_run_begun_in_another_precision(monkeypatch, model_fitted_as, synthetic_root, tmp_path):
    fitted_bf16 = model_fitted_as("1")
    out = tmp_path / "out"
    command = ("predict", str(synthetic_root / "disc" / "test" / "good"), "--model", str(fitted_bf16), "--out",
               str(out), "--quiet")
    monkeypatch.setenv("CLIPFUSION_NATIVE_BF16", "1")
    assert clipfusion_here(*command).returncode == 0
    assert {row["precision"] for row in results(out)} == {"bfloat16"}
    monkeypatch.setenv("CLIPFUSION_NATIVE_BF16", "0")
    refused = clipfusion_here(*command, "--resume")
    assert refused.returncode == 2 and "precision was 'bfloat16', now 'float32'" in refused.stderr
