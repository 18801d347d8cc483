"""Write a detector as an export folder: three graphs, their weights, and the manifest (see ``bundle``).

The detector runs in float32 on the CPU for the export (the graphs carry float32 weights; the runtime
chooses its own precision).  Its text side runs once here: the prompt embeddings become constants of
the graphs, so no tokenizer or text encoder ships.  Every file is written under ``out/.partial`` and
moved into ``out`` when complete; the manifest comes last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipfusion import __version__
from clipfusion.config import RuntimeConfig
from clipfusion.encoders.diffusion import VAE_MEAN, VAE_STD
from clipfusion.encoders.prepacking import convolutions_unpacked
from clipfusion.errors import ClipfusionError
from clipfusion.export.graphs import ClipGraph, DiffusionGraph, VaeGraph
from clipfusion.export.int8_check import Int8Check, measure_int8
from clipfusion.inspection.fingerprint import probe_images
from clipfusion.inspection.models import ModelFile
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.clipfusion.model_file import ModelCard
from clipfusion.outputs import file_sha256, json_safe, json_text, write_atomic
from clipfusion.protocol import Prediction
from clipfusion.runtime.manifest import (
    EXPORT_FORMAT,
    GRAPH_FORMATS,
    MANIFEST,
    import_openvino,
    is_export,
    manifest_digest,
)

logger = logging.getLogger(__name__)
EXPORTABLE_DENSE_MODES = ("vv", "raw", "window")
WEIGHT_FORMATS = ("float32", "int8")


def _versions() -> dict[str, str]:
    names = ("torch", "diffusers", "open_clip_torch", "transformers", "openvino", "onnx")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"clipfusion": __version__, **found}


def _compress_int8(model: Any) -> Any:
    """OpenVINO IR with its weights compressed to 8 bits (NNCF ``compress_weights``, asymmetric per channel);
    activations stay float32."""
    try:
        import nncf
    except ImportError:
        raise ClipfusionError("--weights int8 needs NNCF: pip install 'clipfusion[export]'") from None
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # its tables and progress bar go to stdout
        return nncf.compress_weights(model)


def _write_graph(module: torch.nn.Module, example: torch.Tensor, folder: Path, name: str, graph_format: str,
                 output_names: list[str], weights: str = "float32") -> list[str]:
    """Trace ``module`` on ``example`` and write it as ``name.xml``/``.bin`` or ``name.onnx``; the file names."""
    ov = import_openvino("export", "export")
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns of every Python value it fixes: by design here (batch 1, fixed settings)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=FutureWarning)
        # the TorchScript exporter's deprecation notes (attributed to the caller, so matched by their text)
        warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        if graph_format == "onnx":
            return _write_onnx(module, example, folder, name, output_names)
        model = ov.convert_model(module, example_input=example)
    for port, output in zip(model.outputs, output_names, strict=True):
        port.get_tensor().set_names({output})
    if weights == "int8":
        model = _compress_int8(model)
    ov.save_model(model, str(folder / f"{name}.xml"), compress_to_fp16=False)  # float32 weights: the same maps
    return [f"{name}.xml", f"{name}.bin"]


def _write_onnx(module: torch.nn.Module, example: torch.Tensor, folder: Path, name: str,
                output_names: list[str]) -> list[str]:
    """``name.onnx``, plus ``name.onnx.data`` holding the weights when they pass protobuf's 2 GB limit."""
    try:
        import onnx
    except ImportError:
        raise ClipfusionError("--format onnx needs onnx: pip install 'clipfusion[export]'") from None
    staging = folder / f".{name}-onnx"
    staging.mkdir()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form; the plain path: same maths
    try:
        torch.onnx.export(module, (example,), str(staging / f"{name}.onnx"), input_names=["input"],
                          output_names=output_names, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    files = sorted(path.name for path in staging.iterdir())
    if files == [f"{name}.onnx"]:
        (staging / files[0]).replace(folder / files[0])
        staging.rmdir()
        return files
    # torch wrote one file per weight: gather them into one data file beside the graph
    model = onnx.load(str(staging / f"{name}.onnx"))
    onnx.save_model(model, str(folder / f"{name}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.onnx.data")
    shutil.rmtree(staging)
    return [f"{name}.onnx", f"{name}.onnx.data"]


def export_model(out: Path, graph_format: str, runtime: RuntimeConfig, model: ModelFile | None = None,
                 preset: str | None = None, category: str | None = None, overwrite: bool = False,
                 weights: str = "float32", check: tuple[list[np.ndarray], str] | None = None,
                 force: bool = False) -> Path:
    """``clipfusion export``: the opened model file ``model`` (or a zero-shot ``preset`` for ``category``)
    into ``out``.  check: the images int8 weights are checked on, and what they are
    (``tasks.inputs.int8_check_images``); force: keep an int8 export that flips decisions on them."""
    if model is not None:
        if model.card is None or model.is_export:
            raise ClipfusionError(f"--model {model.path} is already an export; export its .cfm model file")
        detector = CLIPFusion.load(model.path, runtime, card=model.card)
        source = {"model": model.path.name, "sha256": model.sha256}
        fingerprint = None if model.fingerprint is None else model.fingerprint.to_json()
        return export_detector(detector, model.card.category, out, graph_format, model.card, source, overwrite,
                               weights, fingerprint, check, force, release_models=True)
    if preset is None or category is None:
        raise ClipfusionError("a zero-shot export needs both --preset and --category")
    detector = CLIPFusion(preset, runtime)
    return export_detector(detector, category, out, graph_format, None, {"preset": preset, "category": category},
                           overwrite, weights, None, check, force, release_models=True)


def check_exportable(detector: CLIPFusion) -> None:
    config = detector.config
    if config.patchclip.dense_mode not in EXPORTABLE_DENSE_MODES:
        raise ClipfusionError(f"patchclip__dense_mode={config.patchclip.dense_mode!r} cannot be exported (it crops "
                              f"the image itself); use one of {', '.join(EXPORTABLE_DENSE_MODES)}")
    if config.diffusion.naive:
        raise ClipfusionError("diffusion__naive=true is the slow reference path; export without it")


def export_detector(detector: CLIPFusion, category: str, out: Path, graph_format: str = "openvino",
                    card: ModelCard | None = None, source: dict[str, Any] | None = None,
                    overwrite: bool = False, weights: str = "float32", fingerprint: str | None = None,
                    check: tuple[list[np.ndarray], str] | None = None, force: bool = False,
                    release_models: bool = False) -> Path:
    """Write ``detector`` (fitted or not; loaded on the CPU in float32) for ``category`` into ``out``;
    ``fingerprint``: the model file's (``inspection.fingerprint``), kept in the manifest for ``doctor``.

    weights: ``float32`` (the same maps as PyTorch), or ``int8`` (OpenVINO IR only: weights compressed
    to 8 bits, smaller and possibly faster, maps no longer equal).  An int8 export is measured against
    ``detector`` on ``check``'s images (the fingerprint's probes when None) before it is kept
    (``export.int8_check``): one that flips a decision is refused unless ``force``.  release_models: the
    detector's weights are let go (:meth:`CLIPFusion.release_models`) before the int8 graphs are run for
    that check, for a caller that needs them no more (``clipfusion export``): OpenVINO expands the 8-bit
    weights to run them, and both at once were the export's peak."""
    _check_request(graph_format, weights, out, overwrite)
    check_exportable(detector)
    import_openvino("export", "export")
    patchclip, mapdiff = detector._branches()
    if patchclip.encoder.device.type != "cpu" or mapdiff.encoder.device.type != "cpu" \
            or mapdiff.encoder.dtype != torch.float32 or patchclip.encoder.dtype != torch.float32:
        raise ClipfusionError("export runs the models on the CPU in float32: pass --device cpu --dtype float32")
    unet = mapdiff.encoder.unet
    del patchclip, mapdiff  # nothing here may hold the weights once they are released
    images, what = check or (probe_images(), "probe images")
    # the conversion holds a copy of the UNet's weights of its own: no packed third copy beside it (2.2 GB for
    # paper-recon in float32) for the few images the export runs
    with convolutions_unpacked(unet):
        expected = detector.predict(images, category) if weights == "int8" else None
        partial, manifest, files = _write_graphs(detector, category, out, graph_format, card, source, weights)
    del unet
    manifest["fingerprint"] = fingerprint
    if expected is not None:
        if release_models:
            detector.release_models()
        manifest["int8_check"] = _checked_int8(expected, partial, manifest, images, category, what,
                                               force).to_json()
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is no export until the new manifest is in
    for name in files:
        (partial / name).replace(out / name)
    shutil.rmtree(partial)
    write_atomic(out / MANIFEST, json_text({**manifest, "digest": manifest_digest(manifest)}))
    return out


def _write_graphs(detector: CLIPFusion, category: str, out: Path, graph_format: str, card: ModelCard | None,
                  source: dict[str, Any] | None, weights: str) -> tuple[Path, dict[str, Any], list[str]]:
    """The graphs of :func:`export_detector` traced and written under ``out/.partial``: that folder, the
    manifest (without fingerprint and int8 check) and the files written."""
    patchclip, mapdiff = detector._branches()
    blank = np.full((mapdiff.encoder.config.image_size,) * 2 + (3,), 127, dtype=np.uint8)
    with torch.inference_mode():  # fills the text caches and the noise, which the graphs then hold as constants
        detector.encode([blank], category)
    clip_pixels = patchclip.encoder.preprocess([blank])
    vae_pixels = mapdiff.encoder.preprocess([blank])
    latents = mapdiff.encoder.encode_latents(vae_pixels)
    fitted = hasattr(detector, "memory_bank_")
    outputs = {"clip": ["clip_score", "clip_language"] + (["clip_visual"] if fitted else []),
               "vae": ["latents"], "diffusion": ["diff_language"] + (["diff_visual"] if fitted else [])}
    partial = out / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    graphs, files = {}, []
    for name, module, example in (("clip", ClipGraph(detector, category), clip_pixels),
                                  ("vae", VaeGraph(detector), vae_pixels),
                                  ("diffusion", DiffusionGraph(detector, category), latents)):
        logger.info("export: tracing and writing the %s graph", name)
        written = _write_graph(module.eval(), example, partial, name, graph_format, outputs[name], weights)
        graphs[name] = written[0]
        files += written
    manifest = _manifest(detector, category, partial, graph_format, weights, graphs, outputs, files, card, source)
    return partial, manifest, files


def _checked_int8(expected: Prediction, partial: Path, manifest: dict[str, Any], images: list[np.ndarray],
                  category: str, what: str, force: bool) -> Int8Check:
    """The int8 graphs in ``partial`` measured against ``expected``, what the float32 model predicted for
    ``images`` (their manifest written there for the runtime to read); a flipped decision refuses the export
    (``partial`` removed, an earlier export in ``--out`` left as it was) unless ``force``, which warns."""
    write_atomic(partial / MANIFEST, json_text({**manifest, "digest": manifest_digest(manifest)}))
    logger.info("export: checking the int8 weights on %d %s against the float32 model", len(images), what)
    measured = measure_int8(expected, partial, images, category, what)
    if measured.flips:
        if not force:
            shutil.rmtree(partial)
            with contextlib.suppress(OSError):  # --out, when this export made it and left nothing in it
                partial.parent.rmdir()
            raise ClipfusionError(f"{measured.describe()}: not written; export --weights float32, or add --force to "
                                  "keep the int8 export anyway")
        logger.warning("%s; written anyway (--force): these images may now be judged otherwise", measured.describe())
    else:
        logger.info("%s", measured.describe())
    return measured


def _check_request(graph_format: str, weights: str, out: Path, overwrite: bool) -> None:
    """The one-line errors of the export's options and ``--out``, before any model is traced."""
    if graph_format not in GRAPH_FORMATS:
        raise ClipfusionError(f"--format must be one of {', '.join(GRAPH_FORMATS)}, not {graph_format!r}")
    if weights not in WEIGHT_FORMATS:
        raise ClipfusionError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    if weights == "int8" and graph_format != "openvino":
        raise ClipfusionError("--weights int8 is OpenVINO's weight compression: use it with --format openvino")
    if out.exists() and not out.is_dir():
        raise ClipfusionError(f"--out {out} is a file; give a new folder")
    # an interrupted export leaves only its .partial folder: a rerun continues into the same --out
    if out.is_dir() and any(path.name != ".partial" for path in out.iterdir()):
        if not is_export(out):
            raise ClipfusionError(f"--out {out} holds other files; give a new or empty folder")
        if not overwrite:
            raise ClipfusionError(f"--out {out} holds an earlier export; add --overwrite to replace it")


def _manifest(detector: CLIPFusion, category: str, folder: Path, graph_format: str, weights: str,
              graphs: dict[str, str], outputs: dict[str, list[str]], files: list[str], card: ModelCard | None,
              source: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of the graphs written to ``folder`` (without its digest), as it will read back."""
    patchclip, mapdiff = detector._branches()
    config = detector.config
    bank = getattr(detector, "memory_bank_", None)
    manifest = {
        "format": EXPORT_FORMAT, "graph_format": graph_format, "weights": weights, "graphs": graphs,
        "inputs": {"clip": {"size": list(patchclip.encoder.image_size), "mean": list(patchclip.encoder.mean),
                            "std": list(patchclip.encoder.std)},
                   "vae": {"size": [config.diffusion.image_size] * 2, "mean": list(VAE_MEAN), "std": list(VAE_STD)}},
        "outputs": outputs, "preset": config.name, "overrides": detector.overrides,
        "fusion": dataclasses.asdict(config.fusion), "category": category,
        "card": None if card is None else card.to_json(),
        "source": source or {},
        "constants": {"clip_prompts": "the category's state prompt ensembles (prototypes)",
                      "unet_prompts": mapdiff.state_prompts(category).prompts,
                      "noise": {"seed": config.diffusion.noise_seed, "draws": config.diffusion.noise_draws,
                                "timestep": config.diffusion.timestep},
                      "memory_bank": None if bank is None else {k: list(v.shape) for k, v in bank.features.items()}},
        "versions": _versions(),
        "files": {name: file_sha256(folder / name) for name in files},
    }
    return dict(json_safe(json.loads(json.dumps(manifest, default=str))))
