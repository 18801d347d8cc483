"""The model a run inspects with, read once: a model file (``*.cfm``) or an export folder, its card
(settings, category, thresholds, precision), its identity (SHA-256) and the detector it builds.

Every front end opens its model here, once per run (or per model version in the service): the card is
checked and the file hashed in one read, and nothing else reads it again but the detector's own load of
the memory bank.  Torch-free until :meth:`ModelFile.detector` builds a PyTorch detector.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipfusion.config import RuntimeConfig
from clipfusion.decisions import Thresholds
from clipfusion.errors import ClipfusionError
from clipfusion.inspection.fingerprint import Fingerprint
from clipfusion.methods.clipfusion.model_file import ModelCard, read_fingerprint, read_model_file
from clipfusion.outputs import file_sha256
from clipfusion.runtime.manifest import MANIFEST, ExportManifest, is_export, read_manifest
from clipfusion.signing import TrustedKeys, verify

if TYPE_CHECKING:
    from clipfusion.methods.clipfusion.detector import CLIPFusion
    from clipfusion.runtime.exported import ExportedDetector


@dataclass(frozen=True)
class ModelFile:
    """One opened model.  ``card``: the model file's card, or an export's (None for a zero-shot export,
    which has no thresholds); ``manifest``: an export's manifest (None for a model file); ``sha256``:
    the model's identity (the file's SHA-256, or the manifest's, which holds every file's); ``signer``:
    the id of the trusted key whose signature was verified (None: no trusted keys were asked for);
    ``fingerprint``: what the model scored when its thresholds were set (None: written before fingerprints)."""

    path: Path
    card: ModelCard | None
    manifest: ExportManifest | None
    sha256: str
    signer: str | None = None
    fingerprint: Fingerprint | None = None

    @classmethod
    def open(cls, path: str | Path, trusted: TrustedKeys | None = None) -> ModelFile:
        """Read and check the model at ``path`` (a one-line error for anything but an intact model file
        or export folder); with ``trusted`` keys, also its signature, before anything else is read."""
        path = Path(path)
        if is_export(path):
            sha256 = file_sha256(path / MANIFEST)
            signer = None if trusted is None else verify(path, sha256, trusted)
            manifest = read_manifest(path)
            if file_sha256(path / MANIFEST) != sha256:  # replaced between the two reads
                raise ClipfusionError(f"export {path} changed while it was read; try again")
            fingerprint = _fingerprint(manifest.fingerprint, f"export {path}")
            return cls(path, manifest.card, manifest, sha256, signer, fingerprint)
        if path.is_dir():
            raise ClipfusionError(f"{path} is a folder but not a clipfusion export; give a model file (.cfm) from "
                                  "`clipfusion fit`, or a folder from `clipfusion export`")
        signer, signed = None, None
        if trusted is not None and path.is_file():  # a model nobody approved is not even parsed
            signed = file_sha256(path)
            signer = verify(path, signed, trusted)
        card, sha256 = read_model_file(path)
        stored = read_fingerprint(path)
        if signed not in (None, sha256):
            raise ClipfusionError(f"model file {path} changed while it was read; try again")
        return cls(path, card, None, sha256, signer, _fingerprint(stored, f"model file {path}"))

    @property
    def is_export(self) -> bool:
        return self.manifest is not None

    @property
    def category(self) -> str:
        return self.manifest.category if self.manifest is not None else self._card.category

    @property
    def preset(self) -> str:
        return self.manifest.preset if self.manifest is not None else self._card.preset

    @property
    def thresholds(self) -> Thresholds | None:
        return None if self.card is None else self.card.thresholds

    @property
    def recorded_dtype(self) -> str | None:
        """The precision the thresholds were derived in (None: no thresholds)."""
        return None if self.card is None else self.card.dtype

    @property
    def reference_scores(self) -> list[float]:
        """The scores of the held-out normal images behind the thresholds, as the fingerprint records them
        (empty for a model written before fingerprints): the reference of score-drift monitoring."""
        return [] if self.fingerprint is None else [normal.score for normal in self.fingerprint.normals]

    @property
    def _card(self) -> ModelCard:
        assert self.card is not None, "a model file always has a card"
        return self.card

    @property
    def short_id(self) -> str:
        return f"{self.path.name} ({self.sha256[:12]})"

    def check_options(self, fixed: dict[str, Any], method: str = "clipfusion", category: str | None = None,
                      preset: str | None = None) -> None:
        """A one-line error naming every option that contradicts the model, which fixes its method, category,
        preset, settings and references.  ``fixed``: options the model alone decides, by the name the user
        wrote (a value that is None, empty or 0 was not given); ``category`` and ``preset`` may repeat the
        model's own."""
        clashes = [f"{flag} (the model file fixes it)" for flag, value in fixed.items() if value]
        if method != "clipfusion":
            clashes.append(f"--method {method} (the model file is a clipfusion model)")
        if category not in (None, self.category):
            clashes.append(f"--category {category} (the model file's category is {self.category})")
        if preset not in (None, self.preset):
            clashes.append(f"--preset {preset} (the model file's preset is {self.preset})")
        if clashes:
            raise ClipfusionError(f"--model {self.path} contradicts: {'; '.join(clashes)}; drop those options")

    def detector(self, runtime: RuntimeConfig | None = None, batch_size: int = 8) -> CLIPFusion | ExportedDetector:
        """The ready detector: an export on OpenVINO Runtime (no torch; ``runtime``'s dtype only), or the
        model file's :class:`CLIPFusion` (its card already read here)."""
        if self.manifest is not None:
            from clipfusion.runtime.exported import ExportedDetector

            return ExportedDetector(self.path, dtype=(runtime or RuntimeConfig()).dtype, manifest=self.manifest)
        from clipfusion.methods.clipfusion.detector import CLIPFusion

        return CLIPFusion.load(self.path, runtime, batch_size, card=self.card)


def _fingerprint(text: str | None, source: str) -> Fingerprint | None:
    return None if text is None else Fingerprint.from_json(text, source)
