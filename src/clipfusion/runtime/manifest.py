"""The export folder's manifest: what a runtime needs besides the graphs, and a checksum of every file.

Torch-free (the runtime reads it).  ``clipfusion-export.json`` is written last, atomically: a folder
without it is not an export.  It records the format, the graph files and their inputs and outputs,
the settings (preset name, overrides, the fusion settings in full, category), the model card
(thresholds and the precision they were derived in; None for an uncalibrated zero-shot export), the
source model's SHA-256, the package versions, the SHA-256 of every file, and (format 2) ``digest``: the
SHA-256 of the manifest itself (canonical JSON, without that entry), so an edited threshold, fusion
setting, input size or file list is refused.  Every file named is a plain name inside the folder and
listed with its checksum (an IR graph's ``.bin`` too): nothing else is read.  Exports of format 1 (no
precision, no digest) still load, as float32, said once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfusion.config import FusionConfig
from clipfusion.errors import ClipfusionError
from clipfusion.methods.clipfusion.model_file import ModelCard
from clipfusion.notices import say_once
from clipfusion.outputs import file_sha256, json_sha256, read_json

logger = logging.getLogger(__name__)
MANIFEST = "clipfusion-export.json"
EXPORT_FORMAT = "clipfusion-export/2"  # 2: the card records the precision of the thresholds; the manifest's digest
READABLE_FORMATS = ("clipfusion-export/1", EXPORT_FORMAT)
GRAPH_FORMATS = ("openvino", "onnx")
GRAPHS = ("clip", "vae", "diffusion")


@dataclass(frozen=True)
class ExportManifest:
    """What ``clipfusion-export.json`` says.  ``inputs``: per graph, its pixel size and normalisation
    (``size``, ``mean``, ``std``); ``outputs``: per graph, the names of its outputs in order."""

    folder: Path
    graph_format: str
    graphs: dict[str, str]
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, list[str]]
    preset: str
    overrides: dict[str, Any]
    fusion: FusionConfig
    category: str
    card: ModelCard | None
    source: dict[str, Any]
    versions: dict[str, str]
    files: dict[str, str]
    fingerprint: str | None = None  # the model file's (JSON): what it scored when its thresholds were set
    int8_check: dict[str, Any] | None = None  # int8 weights against float32 PyTorch (export.int8_check)


def import_openvino(purpose: str, extra: str) -> Any:
    """The ``openvino`` module, or a one-line error: what needs it and which extra installs it."""
    try:
        import openvino
    except ImportError:
        raise ClipfusionError(f"{purpose} needs OpenVINO: pip install 'clipfusion[{extra}]'") from None
    return openvino


def _fusion(settings: dict[str, Any]) -> FusionConfig:
    """The fusion settings as written by the exporter (JSON lists back to tuples)."""
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    return FusionConfig(**values)


def is_export(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def manifest_digest(data: dict[str, Any]) -> str:
    """The digest a manifest carries: the SHA-256 of its canonical JSON without the ``digest`` entry."""
    return json_sha256({key: value for key, value in data.items() if key != "digest"})


def graph_files(graph: str) -> list[str]:
    """What reading ``graph`` reads: an OpenVINO IR's ``.xml`` and the ``.bin`` of its weights; an ONNX file
    (its external data, if any, is named inside it, and it is checked by its own checksum)."""
    return [graph, graph.removesuffix(".xml") + ".bin"] if graph.endswith(".xml") else [graph]


def _check_names(folder: Path, manifest: ExportManifest) -> None:
    """Every file the manifest names is a plain file name inside ``folder`` (no path, no link out), and each
    graph, with what reading it reads, is listed with a checksum."""
    root = folder.resolve()
    for name in [*manifest.files, *manifest.graphs.values()]:
        if Path(name).name != name or name in ("", ".", "..") or (root / name).resolve().parent != root:
            raise ClipfusionError(f"export {folder}: {MANIFEST} names {name!r}, which is not a file of the export "
                                  "folder; export the model again")
    for graph in manifest.graphs.values():
        unlisted = [name for name in graph_files(graph) if name not in manifest.files]
        if unlisted:
            raise ClipfusionError(f"export {folder}: {MANIFEST} lists no checksum for {', '.join(unlisted)}; export "
                                  "the model again")


def read_manifest(folder: Path, verify: bool = True) -> ExportManifest:
    """The manifest of the export in ``folder``; with ``verify``, every file's checksum is checked (a
    damaged or edited file is a one-line error naming it)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ClipfusionError(f"{folder} is not a clipfusion export (no {MANIFEST}); write one with "
                              "`clipfusion export --model X.cfm --out FOLDER`")
    data = read_json(path, "export manifest", "copy the export folder again, or export the model again")
    if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
        found = data.get("format") if isinstance(data, dict) else None
        raise ClipfusionError(f"{path} is not a {EXPORT_FORMAT} manifest (it says {found!r}); export the model "
                              "again with this version of clipfusion")
    if data["format"] != EXPORT_FORMAT:
        say_once(logger, logging.WARNING, f"export {folder} is of format {data['format']}, which records neither the "
                                          "precision of its thresholds (taken as float32) nor a digest of its "
                                          "manifest (not checked); export the model again")
    elif data.get("digest") != manifest_digest(data):
        raise ClipfusionError(f"export {folder}: {MANIFEST} does not match its digest (edited or damaged: thresholds, "
                              "settings or file list); copy the folder again or export again")
    try:
        card = None if data["card"] is None else ModelCard.from_json(data["card"], path)
        manifest = ExportManifest(folder, data["graph_format"], dict(data["graphs"]), dict(data["inputs"]),
                                  {k: list(v) for k, v in data["outputs"].items()}, data["preset"],
                                  dict(data["overrides"]), _fusion(data["fusion"]), data["category"], card,
                                  dict(data["source"]),
                                  dict(data["versions"]), dict(data["files"]), data.get("fingerprint"),
                                  data.get("int8_check"))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ClipfusionError(f"{path} cannot be read ({exc!r}); export the model again") from None
    if set(manifest.graphs) != set(GRAPHS):
        raise ClipfusionError(f"{path} lists the graphs {sorted(manifest.graphs)}, not {list(GRAPHS)}; export again")
    _check_names(folder, manifest)
    if verify:
        for name, digest in manifest.files.items():
            file = folder / name
            if not file.is_file():
                raise ClipfusionError(f"export {folder}: {name} is missing; copy the whole folder or export again")
            if file_sha256(file) != digest:
                raise ClipfusionError(f"export {folder}: {name} does not match its checksum (damaged or edited); "
                                      "copy the folder again or export again")
    return manifest
