"""clipfusion export and the torch-free runtime: the exported graphs give PyTorch's maps, per branch;
`predict --model FOLDER` runs in a venv without torch (.venv-runtime, built by scripts/test.sh)."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from clipfusion.config import MAP_NAMES, RuntimeConfig
from clipfusion.errors import ClipfusionError
from clipfusion.export.writer import export_detector
from clipfusion.hardware import BF16_SCORE_TOLERANCE
from clipfusion.inspection import ModelFile
from clipfusion.inspection.fingerprint import probe_images
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.runtime.exported import ExportedDetector
from clipfusion.runtime.manifest import manifest_digest
from clipfusion.service.settings import ServiceSettings

from .commands import clipfusion, clipfusion_here, results
from .scenes import pixel_auroc
from .servers import start_server

RUNTIME_VENV = Path(__file__).resolve().parents[1] / ".venv-runtime"
# Agreement asked of an export: max |Δ| of every branch map, the fused map and the score, relative to the
# map's range in PyTorch (measured on these data: about 1e-6; float32 graphs, float32 inference).
RELATIVE_TOLERANCE = 1e-4
FLOAT32 = RuntimeConfig("cpu", "float32")  # what the graphs are compared against (traced from float32 models)


@pytest.fixture(scope="module")
def fitted(scenes) -> CLIPFusion:
    normal, _, _ = scenes
    return CLIPFusion("tiny", FLOAT32, fusion__sigma=0.0).fit(normal[:2], "plate").calibrate(normal[2:], "plate")


def _relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / max(float(np.ptp(expected)), 1e-12))


@pytest.mark.parametrize(("shots", "graph_format"), [(2, "openvino"), (0, "openvino"), (2, "onnx")])
def test_exported_branch_maps_fused_maps_and_decisions_equal_pytorch(scenes, fitted, tmp_path, shots, graph_format):
    _, defective, masks = scenes
    detector = fitted if shots else CLIPFusion("tiny", FLOAT32, fusion__sigma=0.0)
    (tmp_path / "export" / ".partial").mkdir(parents=True)  # what an interrupted export leaves behind
    export_detector(detector, "plate", tmp_path / "export", graph_format)
    assert not (tmp_path / "export" / ".partial").exists()
    exported = ExportedDetector(tmp_path / "export", dtype="float32")
    expected, got = detector.encode(defective, "plate"), exported.encode(defective, "plate")
    for name in ("clip_score", *MAP_NAMES):
        reference = getattr(expected, name)
        if reference is None:  # zero-shot: no visual maps on either side
            assert getattr(got, name) is None
            continue
        assert getattr(got, name).shape == reference.shape, name
        assert _relative_difference(getattr(got, name), reference) <= RELATIVE_TOLERANCE, name
    torch_prediction, exported_prediction = detector.predict(defective, "plate"), exported.predict(defective, "plate")
    assert _relative_difference(exported_prediction.maps, torch_prediction.maps) <= RELATIVE_TOLERANCE
    np.testing.assert_allclose(exported_prediction.scores, torch_prediction.scores, rtol=0,
                               atol=RELATIVE_TOLERANCE * float(np.ptp(torch_prediction.maps)))
    if shots:  # the export carries no thresholds of its own here; the detector's decide both
        exported.thresholds_ = detector.thresholds_
        assert exported.predict(defective, "plate").labels() == torch_prediction.labels()
        # the signal is still found: the exported visual maps rank the dark squares' pixels first
        assert pixel_auroc(masks, got.clip_visual) > 0.95


def test_an_export_packs_no_convolution_weights_and_leaves_the_detector_packing_after(scenes, tmp_path,
                                                                                     monkeypatch):
    # the conversion holds a copy of the weights of its own: the eager packed copies would be a third
    _, defective, _ = scenes
    detector = CLIPFusion("tiny", FLOAT32, fusion__sigma=0.0)
    packings = []
    pack = torch.ops.mkldnn._reorder_convolution_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight",
                        lambda *args: packings.append(args) or pack(*args))
    export_detector(detector, "plate", tmp_path / "export", weights="int8", check=(defective[:2], "test images"))
    assert packings == []
    detector.predict(defective[:1], "plate")
    assert len(packings) > 3  # the UNet's convolutions pack again once the export is done


def test_clipfusion_export_lets_go_of_the_pytorch_weights_before_it_runs_the_int8_graphs(scenes, tmp_path,
                                                                                          monkeypatch):
    # OpenVINO expands the 8-bit weights to run them: beside the PyTorch weights, both at once were the int8
    # export's peak (docs/speed.md)
    _, defective, _ = scenes
    runtime = RuntimeConfig("cpu", "float32", hub_timeout=9.0)  # a runtime of its own: weights no other test holds
    detector = CLIPFusion("tiny", runtime, fusion__sigma=0.0)
    before = detector.predict(defective[:2], "plate")
    unet = weakref.ref(detector._branches()[1].encoder.unet)
    held_while_run = []
    predict = ExportedDetector.predict

    def watched(self, *args, **kwargs):
        gc.collect()
        held_while_run.append(unet() is not None)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(ExportedDetector, "predict", watched)
    export_detector(detector, "plate", tmp_path / "export", weights="int8", check=(defective[:2], "test images"),
                    release_models=True)
    assert held_while_run == [False]
    after = detector.predict(defective[:2], "plate")  # loaded again at its next call: the same weights
    np.testing.assert_array_equal(after.maps, before.maps)
    np.testing.assert_array_equal(after.scores, before.scores)


def test_export_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ClipfusionError, match="dense_mode='tile' cannot be exported"):
        export_detector(CLIPFusion("tiny", patchclip__dense_mode="tile"), "plate", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ClipfusionError, match="holds other files"):
        export_detector(CLIPFusion("tiny"), "plate", tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.txt"]
    # a folder left by an interrupted export (.partial) is taken over: test_exported_branch_maps_... starts from one


def test_int8_weights_are_kept_only_where_no_decision_flips_on_the_images_they_are_checked_on(fitted, scenes,
                                                                                             tmp_path):
    normal, defective, _ = scenes
    images = normal + defective[:4]
    check = (images, "test images")
    forced = export_detector(fitted, "plate", tmp_path / "forced", weights="int8", check=check, force=True)
    fp32 = np.asarray(fitted.predict(images, "plate").scores)
    int8 = np.asarray(ExportedDetector(forced, dtype="float32").predict(images, "plate").scores)
    moved = np.abs(int8 - fp32)
    assert moved.max() > 0  # 8-bit weights move the scores
    recorded = json.loads((forced / "clipfusion-export.json").read_text())["int8_check"]
    assert recorded["images"] == len(images) and recorded["what"] == "test images"
    assert recorded["max_score_difference"] == pytest.approx(float(moved.max()), rel=1e-5)
    thresholds = fitted.thresholds_
    try:
        # the image int8 moves most, with the threshold between its two scores: its decision must flip
        worst = int(moved.argmax())
        between = float(fp32[worst] + int8[worst]) / 2
        flips = int(((fp32 > between) != (int8 > between)).sum())
        assert flips >= 1
        fitted.set_thresholds(dataclasses.replace(thresholds, image=between), "plate")
        with pytest.raises(ClipfusionError, match=rf"{flips} of {len(images)} decisions flipped.*--force"):
            export_detector(fitted, "plate", tmp_path / "refused", weights="int8", check=check)
        assert not (tmp_path / "refused").exists()  # nothing kept, not even the folder
        # above every score: nothing can flip, kept without --force
        fitted.set_thresholds(dataclasses.replace(thresholds, image=float(max(fp32.max(), int8.max())) + 0.05),
                              "plate")
        kept = export_detector(fitted, "plate", tmp_path / "kept", weights="int8", check=check)
        assert json.loads((kept / "clipfusion-export.json").read_text())["int8_check"]["flips"] == 0
    finally:
        fitted.set_thresholds(thresholds, "plate")


def test_an_int8_export_of_a_model_file_asks_for_normal_images_in_one_line(model, tmp_path):
    done = clipfusion_here("export", "--model", str(model), "--weights", "int8", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--normal DIR" in done.stderr and "--force" in done.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def source_model(model_fitted_as) -> Path:
    """The 2-shot tiny model of conftest fitted as on a CPU with native bfloat16: its card records
    bfloat16, so the export's precision rule is exercised on every machine."""
    return model_fitted_as("1")


@pytest.fixture(scope="module")
def exported_model(source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clipfusion export --model disc.cfm`` of ``source_model``, written once."""
    out = tmp_path_factory.mktemp("export") / "disc-ov"
    result = clipfusion_here("export", "--model", str(source_model), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_manifest_names_the_source_and_checksums_every_file(exported_model, source_model):
    manifest = json.loads((exported_model / "clipfusion-export.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(source_model.read_bytes()).hexdigest()
    on_disk = {p.name for p in exported_model.iterdir()} - {"clipfusion-export.json"}
    assert set(manifest["files"]) == on_disk == {"clip.xml", "clip.bin", "vae.xml", "vae.bin", "diffusion.xml",
                                                 "diffusion.bin"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((exported_model / name).read_bytes()).hexdigest() == digest
    assert json.loads(manifest["card"])["category"] == "disc" and "openvino" in manifest["versions"]


def test_doctor_checks_an_export_without_torch_against_the_model_files_fingerprint(exported_model, source_model):
    """``export`` keeps the model file's fingerprint in the manifest; ``doctor`` recomputes it with the
    graphs in .venv-runtime (no torch).  The source was fitted in bfloat16: float32 (or OpenVINO's bf16)
    agrees within the measured tolerance, never "different"."""
    from safetensors import safe_open

    with safe_open(str(source_model), framework="np") as handle:
        recorded = handle.metadata()["fingerprint"]
    manifest = json.loads((exported_model / "clipfusion-export.json").read_text())
    assert manifest["fingerprint"] == recorded
    run = subprocess.run([RUNTIME_VENV / "bin" / "clipfusion", "doctor", "--model", str(exported_model), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = dict(line.split("  ", 1) for line in run.stdout.splitlines())
    assert rows["export"].strip().endswith("every file matches its checksum; disc, preset tiny, thresholds set in "
                                           "bfloat16")
    verdict = rows["verdict"].strip()
    assert verdict.startswith(("same ", "within tolerance ")), verdict
    # independently: the export's probe scores here against the stored ones
    scores = ModelFile.open(exported_model).detector().predict(probe_images(), "disc").scores
    largest = max(abs(a - b) for a, b in zip(json.loads(recorded)["probe_scores"], scores, strict=True))
    assert largest <= BF16_SCORE_TOLERANCE
    if "bfloat16 on cpu -> float32 on cpu" in run.stdout:  # a CPU without native bf16: the graphs run in float32
        assert verdict.startswith("within tolerance ")


def test_predict_with_an_export_runs_without_torch_and_gives_the_model_files_rows(
        exported_model, source_model, synthetic_root, tmp_path):
    """The README's deployment: the export predicted in .venv-runtime, where torch is not installed (both
    sides in float32: the numbers compared are the graphs', not a precision's)."""
    python = RUNTIME_VENV / "bin" / "python"
    assert python.exists(), "run scripts/runtime-venv.sh (scripts/test.sh does) to build .venv-runtime"
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    images = synthetic_root / "disc" / "test"
    run = subprocess.run([RUNTIME_VENV / "bin" / "clipfusion", "predict", str(images), "--model", str(exported_model),
                          "--out", str(tmp_path / "ov"), "--dtype", "float32", "--quiet"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    reference = clipfusion_here("predict", str(images), "--model", str(source_model), "--out", str(tmp_path / "pt"),
                                "--device", "cpu", "--dtype", "float32", "--quiet")
    assert reference.returncode == 0, reference.stderr
    got = {row["path"]: row for row in results(tmp_path / "ov")}
    expected = {row["path"]: row for row in results(tmp_path / "pt")}
    assert got.keys() == expected.keys() and len(got) > 5
    for path, row in expected.items():
        assert abs(got[path]["score"] - row["score"]) < 1e-4, path
        assert got[path]["decision"] == row["decision"] and got[path]["threshold"] == row["threshold"]
        assert len(got[path]["regions"] or []) == len(row["regions"] or [])
    assert (tmp_path / "ov" / "index.html").is_file()


def _edit_threshold(manifest):
    card = json.loads(manifest["card"])
    card["thresholds"]["image"] = 0.0
    manifest["card"] = json.dumps(card)


def _edit_fusion(manifest):
    manifest["fusion"]["alpha_seg"] = 0.9


def _edit_input_size(manifest):
    manifest["inputs"]["clip"]["size"] = [side + 16 for side in manifest["inputs"]["clip"]["size"]]


def _unlist_a_file(manifest):
    del manifest["files"]["clip.bin"]


def _point_outside(manifest):
    manifest["graphs"]["clip"] = "../elsewhere/clip.xml"
    manifest["files"]["../elsewhere/clip.xml"] = manifest["files"]["clip.xml"]


def _point_absolute(manifest):
    manifest["graphs"]["clip"] = "/tmp/clipfusion-elsewhere/clip.xml"
    manifest["files"]["/tmp/clipfusion-elsewhere/clip.xml"] = manifest["files"]["clip.xml"]


@pytest.mark.parametrize(("edit", "redigest", "needle"), [
    (_edit_threshold, False, "does not match its digest"),
    (_edit_fusion, False, "does not match its digest"),
    (_edit_input_size, False, "does not match its digest"),
    (_unlist_a_file, False, "does not match its digest"),
    (_point_outside, False, "does not match its digest"),
    # written again with a matching digest (by someone who knows the format): the checks behind it
    (_unlist_a_file, True, "lists no checksum for clip.bin"),
    (_point_outside, True, "names '../elsewhere/clip.xml', which is not a file of the export folder"),
    (_point_absolute, True, "names '/tmp/clipfusion-elsewhere/clip.xml', which is not a file of the export folder"),
])
def test_an_edited_manifest_is_a_one_line_error_and_nothing_is_read_from_outside(
        exported_model, synthetic_root, tmp_path, edit, redigest, needle):
    edited = tmp_path / "export"
    shutil.copytree(exported_model, edited)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(edited / "clip.xml", tmp_path / "elsewhere" / "clip.xml")  # what the escape would read
    manifest = json.loads((edited / "clipfusion-export.json").read_text())
    edit(manifest)
    if redigest:
        manifest["digest"] = manifest_digest(manifest)
    (edited / "clipfusion-export.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--model", str(edited), "--out",
                             str(out), "--quiet")
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_the_manifest_digest_is_the_sha256_of_its_canonical_json(exported_model):
    manifest = json.loads((exported_model / "clipfusion-export.json").read_text())
    stored = manifest.pop("digest")
    assert stored == hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_a_damaged_export_is_a_one_line_error(exported_model, synthetic_root, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in exported_model.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    weights = bytearray((damaged / "diffusion.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (damaged / "diffusion.bin").write_bytes(bytes(weights))
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--model", str(damaged), "--out",
                             str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    assert "diffusion.bin does not match its checksum" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("asked", [("--device", "cuda"), ("--dtype", "float16")])
def test_an_export_refuses_a_device_or_dtype_it_would_ignore(exported_model, synthetic_root, tmp_path, asked):
    """OpenVINO Runtime runs an export on the CPU in float32 or bfloat16: asking for anything else is a
    one-line error, not a silent CPU run."""
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--model", str(exported_model),
                             "--out", str(tmp_path / "out"), *asked, "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runs on the CPU in float32 or bfloat16" in result.stderr
    assert f"drop {' '.join(asked)}, or pass" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_export_runs_in_its_models_precision_where_this_cpu_can(cpu_kind, exported_model, warnings_said):
    """The card of the export records bfloat16: OpenVINO is asked for bf16 where the CPU has it natively
    (and reports what it runs: a CPU without bf16 computes f32 whatever it is asked), float32 elsewhere."""
    import openvino

    assert json.loads(json.loads((exported_model / "clipfusion-export.json").read_text())["card"])["dtype"] == \
        "bfloat16"
    openvino_bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert ExportedDetector(exported_model).precision == \
        ("bfloat16" if cpu_kind == "1" and openvino_bf16 else "float32")
    said = warnings_said()
    if cpu_kind == "1":
        assert said == []
    else:
        assert len(said) == 1 and "derived in bfloat16" in said[0] and "running in float32" in said[0]
    assert ExportedDetector(exported_model, dtype="float32").precision == "float32"


SERVE_WITHOUT_TORCH = """
import importlib.abc, json, sys
from pathlib import Path

class NoTorch(importlib.abc.MetaPathFinder):  # from here on, any import of torch fails, as where it is absent
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
from clipfusion.data.base import read_rgb
from clipfusion.service.app import create_app
from clipfusion.service.database import make_engine, migrate, session_factory
from clipfusion.config import RuntimeConfig
from clipfusion.service.inspector import ServedModel
from clipfusion.service.uploads import Upload
from clipfusion.service.settings import ServiceSettings
export, image, data = map(Path, sys.argv[1:4])
settings = ServiceSettings(models=(export,), data_dir=data, runtime=RuntimeConfig(dtype="float32"))
data.mkdir()
engine = make_engine(settings.url)
migrate(engine)
served = ServedModel("disc-ov", export, settings, session_factory(engine))
upload = Upload(image.name, read_rgb(image), image.read_bytes(), 0.0)
(identifier,) = served.score([upload], 0)  # a small image: finished in the model's batch
with session_factory(engine).begin() as session:
    from clipfusion.service.tables import Inspection
    row = session.get(Inspection, identifier)
    print(json.dumps({"score": row.score, "decision": row.decision, "sha256": row.model_sha256}))
assert "torch" not in sys.modules
"""


def test_the_service_serves_an_export_without_importing_torch(exported_model, source_model, synthetic_root,
                                                              tmp_path):
    """A ServedModel of the export, in a process where importing torch fails, stores PyTorch's verdict
    (both in float32)."""
    image = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[-1]
    run = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TORCH, str(exported_model), str(image),
                          str(tmp_path / "data")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    stored = json.loads(run.stdout.strip().splitlines()[-1])
    expected = CLIPFusion.load(source_model, FLOAT32).predict([str(image)], "disc")
    assert abs(stored["score"] - float(expected.scores[0])) < 1e-4
    assert stored["decision"] == expected.labels()[0]
    manifest = exported_model / "clipfusion-export.json"
    assert stored["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    with pytest.raises(ClipfusionError, match="is an export, which is fixed"):
        ServiceSettings(models=(exported_model,), learn=True)


def test_clipfusion_serve_serves_an_export_folder_over_http(exported_model, source_model, synthetic_root, tmp_path):
    """The README's `serve --model FOLDER`, through the command itself: uvicorn, the API, PyTorch's verdict
    (both in float32)."""
    image = sorted((synthetic_root / "disc" / "test").rglob("*.png"))[-1]
    refused = clipfusion_here("serve", "--model", str(exported_model), "--compile", "--data", str(tmp_path / "x"))
    assert refused.returncode == 2 and "drop --compile" in refused.stderr and not (tmp_path / "x").exists()
    server = start_server([exported_model], tmp_path / "data", "--dtype", "float32")
    try:
        answer = httpx.post(f"{server.url}/v1/models/disc-ov/inspect", timeout=120,
                            files=[("files", (image.name, image.read_bytes(), "image/png"))])
    finally:
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # as test_service_faults accepts
    assert answer.status_code == 200, answer.text
    (inspection,) = answer.json()["inspections"]
    expected = CLIPFusion.load(source_model, FLOAT32).predict([str(image)], "disc")
    assert abs(inspection["score"] - float(expected.scores[0])) < 1e-4
    assert inspection["decision"] == expected.labels()[0]


def test_the_torch_free_runtime_runs_only_a_signed_export_with_trusted_keys(exported_model, synthetic_root,
                                                                            tmp_path):
    """``sign`` an export folder, then ``predict --trusted-keys`` in .venv-runtime (no torch): its rows name
    the key; the same export unsigned, or signed and then edited, is refused in one line."""
    export = tmp_path / "disc-ov"
    shutil.copytree(exported_model, export)
    assert clipfusion_here("keygen", "--out", str(tmp_path / "quality.key")).returncode == 0
    (tmp_path / "trusted").mkdir()
    shutil.copy(tmp_path / "quality.pub", tmp_path / "trusted")
    done = clipfusion_here("sign", str(export), "--key", str(tmp_path / "quality.key"))
    assert done.returncode == 0 and (export / "clipfusion-export.sig").is_file(), done.stderr
    key = json.loads((export / "clipfusion-export.sig").read_text())["key_id"]

    def runtime_predict(model: Path, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([RUNTIME_VENV / "bin" / "clipfusion", "predict", str(synthetic_root / "disc" / "test"),
                               "--model", str(model), "--trusted-keys", str(tmp_path / "trusted"), "--out",
                               str(tmp_path / out), "--quiet"], capture_output=True, text=True, timeout=300)

    run = runtime_predict(export, "signed")
    assert run.returncode == 0, run.stderr
    assert {row["signer"] for row in results(tmp_path / "signed")} == {key}
    unsigned = tmp_path / "unsigned-ov"
    shutil.copytree(exported_model, unsigned)
    refused = runtime_predict(unsigned, "unsigned")
    assert refused.returncode == 2 and "is not signed" in refused.stderr and "Traceback" not in refused.stderr
    manifest = json.loads((export / "clipfusion-export.json").read_text())
    manifest["preset"] = "fast"  # an edit after signing: the manifest's identity changes
    (export / "clipfusion-export.json").write_text(json.dumps(manifest))
    edited = runtime_predict(export, "edited")
    assert edited.returncode == 2 and "signs another version" in edited.stderr
    assert not (tmp_path / "edited").exists() and not (tmp_path / "unsigned").exists()


def test_every_audit_case_is_one_line_in_a_real_process(model, exported_model, synthetic_root, tmp_path):
    """Each case of the integrity audit (issue 31) as a user meets it, in its own ``clipfusion`` process:
    exit 2, one line, no traceback, and no output folder left behind."""
    from .test_model_file import (
        _edit_the_threshold,
        _flip_a_bank_byte,
        _join,
        _split,
        _transpose_a_shape,
        _zero_the_bank,
    )

    images = str(synthetic_root / "disc" / "test")
    cases: dict[str, list[str]] = {}
    for tamper in (_flip_a_bank_byte, _zero_the_bank, _edit_the_threshold, _transpose_a_shape):
        edited = tmp_path / f"{tamper.__name__}.cfm"
        edited.write_bytes(_join(*tamper(*_split(model))))
        cases[tamper.__name__] = ["predict", images, "--model", str(edited)]
    for edit in (_edit_threshold, _edit_fusion, _unlist_a_file, _point_outside, _edit_input_size):
        edited = tmp_path / edit.__name__
        shutil.copytree(exported_model, edited)
        manifest = json.loads((edited / "clipfusion-export.json").read_text())
        edit(manifest)
        (edited / "clipfusion-export.json").write_text(json.dumps(manifest))
        cases[f"export{edit.__name__}"] = ["predict", images, "--model", str(edited)]
    broken = tmp_path / "invalid-json"
    shutil.copytree(exported_model, broken)
    (broken / "clipfusion-export.json").write_text('{"format": "clipfusion-export/2", ')
    cases["export_invalid_json"] = ["predict", images, "--model", str(broken)]
    for option, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--max-pixels", "0")):
        cases[f"{option}{value}"] = ["predict", images, "--model", str(model), option, value]
    cases["unwritable_out"] = ["predict", images, "--model", str(model), "--out", "/sys/clipfusion-audit"]
    for name, args in cases.items():
        out = tmp_path / "outputs" / name
        done = clipfusion(*args, *([] if "--out" in args else ["--out", str(out)]), "--quiet")
        assert done.returncode == 2, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, (name, done.stderr)
        assert not out.exists(), name
    assert "export the model again" in clipfusion(*cases["export_invalid_json"], "--out", str(tmp_path / "x")).stderr


def test_a_graph_that_is_a_link_out_of_the_folder_is_refused(exported_model, synthetic_root, tmp_path):
    """clip.xml replaced by a link to an identical file outside: its checksum matches, the manifest is
    untouched, and still nothing outside the folder is read."""
    linked = tmp_path / "export"
    shutil.copytree(exported_model, linked)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(linked / "clip.xml", tmp_path / "elsewhere" / "clip.xml")
    (linked / "clip.xml").symlink_to(tmp_path / "elsewhere" / "clip.xml")
    result = clipfusion_here("predict", str(synthetic_root / "disc" / "test"), "--model", str(linked), "--out",
                             str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2 and "names 'clip.xml', which is not a file of the export folder" in result.stderr
    assert not (tmp_path / "out").exists()
