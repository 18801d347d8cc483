"""CLIPFusion, the public detector: fit on a few normal images (or not), predict scores and maps."""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from clipfusion import __version__
from clipfusion.config import SETTING_GROUPS, FusionConfig, Preset, RuntimeConfig, get_preset, override
from clipfusion.decisions import Thresholds
from clipfusion.encoders import cache
from clipfusion.encoders.precompiled import PrecompiledParts
from clipfusion.errors import ClipfusionError
from clipfusion.hardware import precision_note
from clipfusion.images import Images, as_rgb_list
from clipfusion.methods.clipfusion.fusion import BranchMaps, fuse
from clipfusion.methods.clipfusion.mapdiff import MapDiff
from clipfusion.methods.clipfusion.model_file import FORMAT, FORMAT_VERSION, ModelCard, read_card, with_digest
from clipfusion.methods.clipfusion.patchclip import PatchClip
from clipfusion.methods.estimator import Estimator
from clipfusion.methods.memory import MemoryBank
from clipfusion.notices import say_once
from clipfusion.outputs import write_atomic
from clipfusion.protocol import Prediction
from clipfusion.timing import StageTimer

logger = logging.getLogger(__name__)


def _array(values: torch.Tensor) -> np.ndarray:
    """A branch map as fusion takes it: float32 NumPy on the CPU."""
    return values.detach().float().cpu().numpy()


def _quiet() -> bool | None:
    """tqdm's ``disable``: off when clipfusion's log level hides information (``--quiet``); otherwise
    None, which shows the bar on a terminal only."""
    return True if not logging.getLogger("clipfusion").isEnabledFor(logging.INFO) else None


class CLIPFusion(Estimator):
    """Zero-/few-shot anomaly detector fusing PatchCLIP (CLIP) and MapDiff (Stable Diffusion).

    scikit-learn style: settings are stored by the constructor and nothing runs there; ``fit``
    builds the few-shot memory banks from normal images and returns ``self`` (learned state ends
    in ``_``); an unfitted detector predicts zero-shot.  Images are (H, W, 3) uint8 RGB arrays.
    ``runtime`` defaults to ``auto`` device and dtype, as on the command line (``RuntimeConfig``); a
    loaded model file runs in the precision it records where this machine computes it natively.
    ``get_params()`` gives the constructor's arguments (``overrides`` flattened, as passed), so
    ``CLIPFusion(**d.get_params())`` is an equal unfitted detector; ``describe()`` the settings in full.
    A fitted, calibrated or loaded detector predicts for its own category without being told it again.

    Example::

        detector = CLIPFusion.from_preset("paper-recon", device="cuda", dtype="float16")
        detector.fit(normal_images, category="bottle")            # omit for zero-shot
        prediction = detector.predict(test_images, category="bottle")
        prediction.scores, prediction.maps                         # (N,), (N, 256, 256)
    """

    references_: list[dict[str, str]]  # of a loaded model file: name and sha256 of each reference
    precision_: tuple[str, str]  # (dtype, device kind) the thresholds were derived in: calibrate's, or the file's
    path_: Path  # of a loaded model file: where it was read from
    _BUILT = ("_built", "_resolved")

    def __init__(self, preset: str | Preset = "paper-recon", runtime: RuntimeConfig | None = None,
                 batch_size: int = 8, **overrides: Any) -> None:
        self.preset = preset
        self.runtime = runtime
        self.batch_size = batch_size
        self.overrides = overrides

    @classmethod
    def from_preset(cls, name: str = "paper-recon", device: str = "auto", dtype: str = "auto",
                    offline: bool = False, cache_dir: str | None = None, batch_size: int = 8,
                    **overrides: Any) -> CLIPFusion:
        """A detector of preset ``name`` with ``<group>__<field>=value`` overrides (see config.get_preset)."""
        return cls(name, RuntimeConfig(device, dtype, offline, cache_dir), batch_size, **overrides)

    # --- settings ---------------------------------------------------------------------------------

    @property
    def config(self) -> Preset:
        base = get_preset(self.preset) if isinstance(self.preset, str) else self.preset
        return override(base, **self.overrides)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments as given: ``preset``, ``runtime``, ``batch_size`` and each override."""
        return {"preset": self.preset, "runtime": self.runtime, "batch_size": self.batch_size, **self.overrides}

    def set_params(self, **params: Any) -> CLIPFusion:
        """Change settings: ``preset``, ``runtime``, ``batch_size``, or any ``group__field`` override
        (checked against the preset at once); the models are built again when next needed."""
        named = {key: params.pop(key) for key in ("preset", "runtime", "batch_size") if key in params}
        preset = named.get("preset", self.preset)
        override(get_preset(preset) if isinstance(preset, str) else preset, **{**self.overrides, **params})
        self.overrides = {**self.overrides, **params}
        return super().set_params(**named)

    def describe(self) -> dict[str, Any]:
        """The settings in full, with the device and dtype that run (``auto`` resolved)."""
        config = self.config
        return {"preset": config.name, **{g: dataclasses.asdict(getattr(config, g)) for g in
                                          SETTING_GROUPS},
                "runtime": dataclasses.asdict(self.runtime_), "batch_size": self.batch_size}

    @property
    def runtime_(self) -> RuntimeConfig:
        """The runtime the models run with: ``auto`` resolved, for a loaded model file in the precision
        it records where this machine computes it natively (``hardware.model_precision``)."""
        if not hasattr(self, "_resolved"):
            asked = self.runtime or RuntimeConfig()
            recorded = self.precision_[0] if hasattr(self, "precision_") else None
            self._resolved, reason = asked.resolved(recorded)
            if reason is not None:
                say_once(logger, *precision_note(f"model file {getattr(self, 'path_', '')}", reason, asked.dtype,
                                                 "`clipfusion calibrate` derives the thresholds again here"))
        return self._resolved

    @property
    def precision(self) -> str:
        """The dtype the models run in (``runtime_``'s), as rows and reports name it."""
        return self.runtime_.dtype

    @property
    def timings_(self) -> StageTimer:
        """Seconds per stage (clip, vae, unet, maps, memory, fusion), summed over calls; for benchmarks."""
        if not hasattr(self, "_timer"):
            self._timer = StageTimer()
        return self._timer

    def _branches(self) -> tuple[PatchClip, MapDiff]:
        if not hasattr(self, "_built"):
            config, runtime = self.config, self.runtime_
            with tqdm(total=2, desc="loading models", disable=_quiet()) as bar:
                bar.set_postfix_str(f"CLIP {config.clip.model_name}")
                patchclip = PatchClip(cache.clip_encoder(config.clip, runtime), config.patchclip, config.prompts)
                bar.update()
                bar.set_postfix_str(f"Stable Diffusion {config.diffusion.model_id}")
                mapdiff = MapDiff(cache.diffusion_encoder(config.diffusion, runtime), config.mapdiff, config.prompts)
                bar.update()
            self._built = (patchclip, mapdiff)
        return self._built

    def release_models(self) -> None:
        """Let go of the models' weights: this detector's and the ones the process shares
        (``encoders.cache``), so that their memory can go once nothing else holds them.  They load again at
        the next call, the same weights (read from their files again; random ones drawn from a fixed seed)."""
        self.__dict__.pop("_built", None)
        cache.release()

    def _settings_bank_fields(self) -> dict[str, Any]:
        """What a memory bank must agree on that the settings alone decide (no model is built)."""
        config = self.config
        return {
            "clip_visual_blocks": list(config.patchclip.visual_blocks),
            "diffusion_image_size": config.diffusion.image_size,
            "timestep": config.diffusion.timestep,
            "noise_seed": config.diffusion.noise_seed,
            "feature_blocks": list(config.diffusion.feature_blocks),
            "feature_prompt": [config.mapdiff.template, " or ".join(config.mapdiff.normal_words
                                                                     + config.mapdiff.anomalous_words)
                               if config.mapdiff.joint_prompt else config.mapdiff.normal_words[0]],
        }

    def precompiled_parts(self) -> PrecompiledParts | None:
        """The UNet pass's and the autoencoder's precompiled packages (``RuntimeConfig.precompiled``), None
        when they run eager or through ``--compile``."""
        return getattr(self._branches()[1].encoder, "precompiled", None)

    def weights_digests(self) -> dict[str, str]:
        """Encoder → a digest of its weights, the same in any precision (``encoders.digest``)."""
        from clipfusion.encoders.digest import weights_digest

        patchclip, mapdiff = self._branches()
        return {"clip": weights_digest(patchclip.encoder.model), "unet": weights_digest(mapdiff.encoder.unet),
                "vae": weights_digest(mapdiff.encoder.vae),
                "text_encoder": weights_digest(mapdiff.encoder.text_encoder)}

    def bank_settings(self) -> dict[str, Any]:
        """What a memory bank must agree on with this detector to be usable by it."""
        patchclip, mapdiff = self._branches()
        return {"clip_model": patchclip.encoder.model_id, "clip_image_size": list(patchclip.encoder.image_size),
                "diffusion_model": mapdiff.encoder.model_id, **self._settings_bank_fields()}

    # --- learning ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def fit(self, images: Images, category: str | None = None, reference_names: Sequence[str] | None = None,
            progress: bool = False) -> CLIPFusion:
        """Build the CLIP and diffusion memory banks from ``images``, normal images of ``category``
        (paths, PIL images or arrays, one or a list: ``clipfusion.images``)."""
        category = self._category(category)
        images = as_rgb_list(images)
        if len(images) == 0:
            raise ClipfusionError("fit needs at least one normal image")
        self.memory_bank_ = MemoryBank(manifest={**self.bank_settings(), "category": category, "k": 0,
                                                 "references": []})
        self.category_ = category
        return self.add_references(images, category, reference_names, progress)

    @torch.inference_mode()
    def add_references(self, images: Images, category: str | None = None,
                       reference_names: Sequence[str] | None = None, progress: bool = False) -> CLIPFusion:
        """Add normal ``images`` to the memory bank (a fitted detector's, or a new one): what learning
        from a confirmed false alarm does.  Thresholds are not changed: ``calibrate`` again."""
        category = self._category(category)
        images = as_rgb_list(images)
        if not hasattr(self, "memory_bank_"):
            return self.fit(images, category, reference_names, progress)
        if self.category_ != category:
            raise ClipfusionError(f"the memory bank was fit on {self.category_!r}, not {category!r}")
        patchclip, mapdiff = self._branches()
        bank = self.memory_bank_
        for start in tqdm(range(0, len(images), self.batch_size), desc="fit (references)", disable=not progress):
            batch = images[start:start + self.batch_size]
            for block, tokens in patchclip.run(batch, category).visual_tokens.items():
                bank.add(f"clip/block{block}", tokens)
            for block, grid in mapdiff.reference_features(batch, category).items():
                bank.add(f"diffusion/up{block}", grid.permute(0, 2, 3, 1))
        bank.manifest["k"] = int(bank.manifest.get("k", 0)) + len(images)
        bank.manifest["references"] = [*bank.manifest.get("references", []), *(reference_names or [])]
        return self

    def save_memory(self, path: str | Path) -> Path:
        if not hasattr(self, "memory_bank_"):
            raise ClipfusionError("nothing to save: fit the detector on normal images first")
        return self.memory_bank_.save(path)

    def load_memory(self, path: str | Path) -> CLIPFusion:
        bank = MemoryBank.load(path)
        # what the settings alone decide is checked before any model is built (seconds to minutes)
        bank.check_compatible(self._settings_bank_fields(), source=str(path))
        bank.check_compatible(self.bank_settings(), source=str(path))
        config = self.config
        bank.check_layers([f"clip/block{b}" for b in config.patchclip.visual_blocks]
                          + [f"diffusion/up{b}" for b in config.diffusion.feature_blocks], source=str(path))
        self.memory_bank_ = bank
        self.category_ = str(bank.manifest.get("category"))
        return self

    @torch.inference_mode()
    def calibrate(self, normal_images: Images, category: str | None = None, progress: bool = False) -> CLIPFusion:
        """Set ``thresholds_`` from normal images that are **not** the references: the image and
        pixel thresholds and the normal-score statistics (see :class:`Thresholds`).  Images held in
        memory; from files, ``clipfusion.inspection.derive_thresholds`` reads them batch by batch."""
        category = self._category(category)
        images = as_rgb_list(normal_images)
        predictions = (self.predict(images[start:start + self.batch_size], category)
                       for start in tqdm(range(0, len(images), self.batch_size), desc="thresholds (held-out normals)",
                                         disable=not progress))
        return self.set_thresholds(Thresholds.from_batches((p.scores, p.maps) for p in predictions), category)

    def set_thresholds(self, thresholds: Thresholds, category: str | None = None) -> CLIPFusion:
        """Use ``thresholds`` (derived with this detector, in its runtime's precision, which they record)."""
        self.thresholds_ = thresholds
        self.category_ = self._category(category)
        self.precision_ = (self.runtime_.dtype, self.runtime_.device.split(":")[0])
        return self

    def save(self, path: str | Path, references: Sequence[dict[str, str]] | None = None,
             fingerprint: str | None = None) -> Path:
        """Write the inspection model file (see ``model_file``): settings, memory bank (if fitted),
        thresholds (``calibrate`` first), ``references`` (name and sha256 of each reference file) and
        ``fingerprint`` (JSON, ``clipfusion.inspection.fingerprint``: what it scores on the probes)."""
        if not hasattr(self, "thresholds_"):
            raise ClipfusionError("nothing to save: calibrate the detector on held-out normal images first")
        if not isinstance(self.preset, str):
            raise ClipfusionError("only detectors of a named preset can be saved (pass overrides for the rest)")
        dtype, device = getattr(self, "precision_", (self.runtime_.dtype, self.runtime_.device.split(":")[0]))
        card = ModelCard(preset=self.preset, overrides=dict(self.overrides), category=self.category_,
                         prompt_name=self.config.prompts.name_of(self.category_),
                         references=list(references if references is not None else getattr(self, "references_", [])),
                         thresholds=self.thresholds_, version=__version__,
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"), dtype=dtype, device=device)
        bank = getattr(self, "memory_bank_", None)
        tensors = {} if bank is None else {k: v.contiguous() for k, v in bank.features.items()}
        manifest = {} if bank is None else {**bank.manifest, "version": __version__}
        metadata = {"format": f"{FORMAT}/{FORMAT_VERSION}", "model": card.to_json(), "manifest": json.dumps(manifest)}
        if fingerprint is not None:
            metadata["fingerprint"] = fingerprint
        data = with_digest(tensors, metadata=metadata)
        write_atomic(Path(path), data)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, runtime: RuntimeConfig | None = None, batch_size: int = 8,
             card: ModelCard | None = None) -> CLIPFusion:
        """A ready detector from a model file written by :meth:`save`: settings, bank and thresholds.
        With ``runtime``'s dtype ``auto`` (the default) it runs in the precision the file records where
        this machine computes it natively, otherwise in float32, said once (``runtime_``).

        The card is checked field by field before anything else; the bank is then checked against
        the settings (it must be the bank these settings make).  ``card``: the file's card, already
        read and checked (``clipfusion.inspection.ModelFile``); read here when None."""
        path = Path(path)
        card = card or read_card(path)
        detector = cls(card.preset, runtime, batch_size, **card.overrides)
        detector.precision_ = (card.dtype, card.device)  # before any model is built: it decides the dtype
        detector.path_ = path
        with safe_open(str(path), framework="pt") as handle:
            has_bank = bool(list(handle.keys()))
        if has_bank:
            detector.load_memory(path)
            if detector.category_ != card.category:
                raise ClipfusionError(f"model file {path}: its bank was fit on {detector.category_!r} but the file "
                                      f"says {card.category!r}; write it again with `clipfusion fit`")
        detector.category_ = card.category
        detector.thresholds_ = card.thresholds
        detector.references_ = card.references
        return detector

    # --- inference --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: Images, category: str | None = None) -> BranchMaps:
        """The expensive part of ``predict``: every branch map of ``images`` on its own grid."""
        category = self._category(category)
        images = as_rgb_list(images)
        fitted = hasattr(self, "memory_bank_")
        if fitted and self.category_ != category:
            raise ClipfusionError(f"the memory bank was fit on {self.category_!r}, not {category!r}")
        patchclip, mapdiff = self._branches()
        timer = self.timings_
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            with timer("clip"):
                clip_out = patchclip.run(batch, category)
            diff_out = mapdiff.run(batch, category, with_features=fitted, timer=timer)
            clip_visual = diff_visual = None
            if fitted:
                with timer("memory"):
                    neighbours = self.config.memory.neighbours
                    clip_visual = _array(patchclip.visual_map(clip_out.visual_tokens, self.memory_bank_, neighbours))
                    diff_visual = _array(mapdiff.visual_map(diff_out.features, self.memory_bank_, neighbours))
            parts.append(BranchMaps(clip_score=_array(clip_out.image_score),
                                    clip_language=_array(clip_out.language_map),
                                    diff_language=_array(diff_out.language_map), clip_visual=clip_visual,
                                    diff_visual=diff_visual))
        return BranchMaps.concat(parts)

    def fuse(self, maps: BranchMaps, fusion: FusionConfig | None = None) -> Prediction:
        """Fuse branch maps from :meth:`encode`; pass another FusionConfig to sweep α, σ... for free."""
        with self.timings_("fusion"):
            return fuse(maps, fusion or self.config.fusion)

    def predict(self, images: Images, category: str | None = None) -> Prediction:
        """Image scores (N,) and pixel maps (N, S, S) at the fusion output size; higher = more anomalous.
        ``category``: the object name in the prompts; by default the one fitted, calibrated or loaded
        (a fitted detector refuses another), else ``object``.
        ``prediction.maps_at_input_size()`` gives each map at its image's own size; a calibrated
        detector's prediction also gives ``labels()`` (OK/NG) and ``regions()``."""
        images = as_rgb_list(images)
        if len(images) == 0:
            raise ClipfusionError("predict needs at least one image")
        prediction = self.fuse(self.encode(images, self._category(category)))
        prediction.input_sizes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
        thresholds = getattr(self, "thresholds_", None)
        if thresholds is not None:
            prediction.image_threshold, prediction.pixel_threshold = thresholds.image, thresholds.pixel
        return prediction
