"""The inspection model file (``*.cfm``): one safetensors file (no pickle) that holds everything a
fitted CLIPFusion detector needs to run on a line.

Tensors: the memory bank's layers (none for a zero-shot model).  Metadata (JSON strings):
``format`` (``clipfusion-model``), ``model`` (the card below), ``manifest`` (the bank's own
manifest, so ``predict --memory`` reads the same file) and ``fingerprint`` (what the model scored on
seeded probe images and its held-out normals, and what ran it: ``clipfusion.inspection.fingerprint``;
absent in files written before it).  The card records the preset and every
override, the category and the object name used in prompts, the references (file names and
SHA-256), the image and pixel thresholds and how they were derived from held-out normal images
(never the references), the held-out normal-score statistics behind the normalised score, the
precision (dtype and device kind) the bank and thresholds were computed in, the package version and
the creation time.  ``digest`` (format 3): a SHA-256 over the header (every tensor's name, dtype, shape
and place, and the metadata but the digest itself) and every byte of every tensor, checked before the
card is trusted, so an edited threshold, a flipped bit or a zeroed bank is a one-line error, never a
score.  Loading checks every field too.  Files of format 2 (no precision, no digest) still load, as
float32 on the CPU, said once.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from safetensors import safe_open

from clipfusion.config import DTYPES, get_preset
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError, SettingError
from clipfusion.notices import say_once
from clipfusion.outputs import json_sha256

logger = logging.getLogger(__name__)
FORMAT = "clipfusion-model"
# 2: the thresholds carry the normal pixels' median (the colour scale); 3: the precision they were computed in,
# and a digest of every byte
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MODEL_SUFFIX = ".cfm"
DEVICE_KINDS = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class ModelCard:
    """What a model file says about itself (the ``model`` metadata entry)."""

    preset: str
    overrides: dict[str, Any]
    category: str
    prompt_name: str
    references: list[dict[str, str]]
    thresholds: Thresholds
    version: str
    created: str
    dtype: str = "float32"  # the precision the bank and thresholds were computed in (format 2: float32)
    device: str = "cpu"  # the kind of device they were computed on (cpu, cuda, mps)

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: Path) -> ModelCard:
        """Parse and check every field; a damaged or tampered card is a one-line error naming it."""
        def bad(what: str) -> ClipfusionError:
            return ClipfusionError(f"model file {source}: {what}; write it again with `clipfusion fit`")

        try:
            data = json.loads(text)
            thresholds = Thresholds(**data.pop("thresholds"))
            card = cls(thresholds=thresholds, **data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise bad(f"its description cannot be read ({exc})") from None
        if not isinstance(card.overrides, dict) or not isinstance(card.references, list):
            raise bad("overrides or references have the wrong shape")
        if card.dtype not in DTYPES or card.device not in DEVICE_KINDS:
            raise bad(f"its precision ({card.dtype!r} on {card.device!r}) is not one clipfusion computes in")
        numbers = [card.thresholds.image, card.thresholds.pixel, card.thresholds.normal_min,
                   card.thresholds.normal_max, card.thresholds.normal_mean, card.thresholds.normal_std,
                   card.thresholds.pixel_median]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
            raise bad("a threshold or normal statistic is not a finite number")
        if (card.thresholds.n_normals < 1 or card.thresholds.normal_min > card.thresholds.normal_max
                or card.thresholds.pixel_median > card.thresholds.pixel):
            raise bad("the normal-score statistics are inconsistent")
        try:
            get_preset(card.preset, **card.overrides)
        except (ClipfusionError, SettingError) as exc:
            raise bad(f"its settings are not valid ({exc})") from None
        return card


class _Hashing:
    """A binary reader that also feeds every byte read into ``sha256``: one pass gives a file's contents
    digest and its whole-file SHA-256 (the model's identity)."""

    def __init__(self, data: BinaryIO) -> None:
        self.data, self.sha256 = data, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        block = self.data.read(size)
        self.sha256.update(block)
        return block


def contents_digest(data: BinaryIO | _Hashing) -> str:
    """SHA-256 of a safetensors file read from ``data``: its header as canonical JSON, without the
    ``digest`` metadata entry (so the digest can be stored in the file it covers), then every byte after
    the header (the tensors).  The header names each tensor's dtype, shape and byte range."""
    (length,) = struct.unpack("<Q", data.read(8))
    header = json.loads(data.read(length))
    header.get("__metadata__", {}).pop("digest", None)
    digest = hashlib.sha256(json_sha256(header).encode())
    for block in iter(lambda: data.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def with_digest(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """A model file's bytes (safetensors, torch tensors) with its ``digest`` among the metadata."""
    from safetensors.torch import save

    digest = contents_digest(io.BytesIO(save(tensors, metadata=metadata)))
    return bytes(save(tensors, metadata={**metadata, "digest": digest}))


# (path, size, mtime) → (digest, file SHA-256): a file read again in one process is not hashed again
_verified: dict[tuple[str, int, int], tuple[str, str]] = {}


def _check_digest(path: Path, metadata: dict[str, str]) -> str:
    """The file's SHA-256; a one-line error unless its contents match the digest it carries (format 3),
    or (format 2) after a warning that nothing is checked.  One read of the file for both."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    stored = metadata.get("digest")
    if key in _verified and _verified[key][0] == stored:
        return _verified[key][1]
    with path.open("rb") as handle:
        reader = _Hashing(handle)
        found = contents_digest(reader)
    version = int(metadata["format"].rpartition("/")[2])
    if version >= 3 and stored is None:
        raise ClipfusionError(f"model file {path} carries no digest of its contents (format {FORMAT}/3 must): it "
                              "was edited or damaged; use the file `clipfusion fit` wrote, or fit again")
    if version >= 3 and found != stored:
        raise ClipfusionError(f"model file {path} does not match its digest: its settings, thresholds or memory bank "
                              "were edited or damaged after it was written; copy it again, or fit again with "
                              "`clipfusion fit`")
    _verified[key] = (stored or "", reader.sha256.hexdigest())
    return reader.sha256.hexdigest()


def read_model_file(path: Path) -> tuple[ModelCard, str]:
    """The card of the model file at ``path`` and the file's SHA-256 (its identity), from one read: the
    digest is checked (format 3) before the card is trusted.  No model is built, no torch imported."""
    if not path.is_file():
        raise ClipfusionError(f"model file {path} not found")
    try:
        # numpy, not pt: the card is read before torch is imported (a one-line error must not wait for it)
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise ClipfusionError(f"{path} is not a clipfusion model file: {exc}") from None
    readable = {f"{FORMAT}/{version}": version for version in READABLE_VERSIONS}
    if metadata.get("format") not in readable:
        raise ClipfusionError(f"{path} is not a clipfusion model file of format {FORMAT}/{FORMAT_VERSION} (it says "
                              f"{metadata.get('format')!r}); write it with `clipfusion fit --out X{MODEL_SUFFIX}`")
    if readable[metadata["format"]] < 3:
        say_once(logger, logging.WARNING, f"model file {path} is of format {FORMAT}/2, which records neither the "
                                          "precision of its thresholds (taken as float32) nor a digest of its "
                                          "contents (not checked); `clipfusion calibrate` writes it again in format "
                                          f"{FORMAT_VERSION}, with thresholds derived here")
    sha256 = _check_digest(path, metadata)
    return ModelCard.from_json(metadata.get("model", ""), path), sha256


def read_fingerprint(path: Path) -> str | None:
    """The fingerprint (JSON) the model file at ``path`` carries, None for a file written before
    fingerprints; call after :func:`read_model_file` has checked the digest that covers it."""
    with safe_open(str(path), framework="np") as handle:
        return (handle.metadata() or {}).get("fingerprint")


def read_card(path: Path) -> ModelCard:
    """The card of the model file at ``path`` (see :func:`read_model_file`)."""
    return read_model_file(path)[0]
