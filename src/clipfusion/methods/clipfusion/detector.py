"""CLIPFusion, the public detector: fit on a few normal images (or not), predict scores and maps."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clipfusion.config import SETTING_GROUPS, FusionConfig, Preset, RuntimeConfig, get_preset, override
from clipfusion.encoders import cache
from clipfusion.errors import ClipfusionError
from clipfusion.images import Images, as_rgb_list
from clipfusion.methods.clipfusion.fusion import BranchMaps, fuse
from clipfusion.methods.clipfusion.mapdiff import MapDiff
from clipfusion.methods.clipfusion.patchclip import PatchClip
from clipfusion.methods.memory import MemoryBank
from clipfusion.protocol import Prediction
from clipfusion.timing import StageTimer


class CLIPFusion:
    """Zero-/few-shot anomaly detector fusing PatchCLIP (CLIP) and MapDiff (Stable Diffusion).

    scikit-learn style: settings are stored by the constructor and nothing runs there; ``fit``
    builds the few-shot memory banks from normal images and returns ``self`` (learned state ends
    in ``_``); an unfitted detector predicts zero-shot.  Images are (H, W, 3) uint8 RGB arrays.

    Example::

        detector = CLIPFusion.from_preset("paper-recon", device="cuda", dtype="float16")
        detector.fit(normal_images, category="bottle")            # omit for zero-shot
        prediction = detector.predict(test_images, category="bottle")
        prediction.scores, prediction.maps                         # (N,), (N, 256, 256)
    """

    def __init__(self, preset: str | Preset = "paper-recon", runtime: RuntimeConfig | None = None,
                 batch_size: int = 8, **overrides: Any) -> None:
        self.preset = preset
        self.runtime = runtime
        self.batch_size = batch_size
        self.overrides = overrides

    @classmethod
    def from_preset(cls, name: str = "paper-recon", device: str = "cpu", dtype: str = "float32",
                    offline: bool = False, cache_dir: str | None = None, batch_size: int = 8,
                    **overrides: Any) -> CLIPFusion:
        """A detector of preset ``name`` with ``<group>__<field>=value`` overrides (see config.get_preset)."""
        return cls(name, RuntimeConfig(device, dtype, offline, cache_dir), batch_size, **overrides)

    # --- settings ---------------------------------------------------------------------------------

    @property
    def config(self) -> Preset:
        base = get_preset(self.preset) if isinstance(self.preset, str) else self.preset
        return override(base, **self.overrides)

    def get_params(self) -> dict[str, Any]:
        config = self.config
        return {"preset": config.name, **{g: dataclasses.asdict(getattr(config, g)) for g in
                                          SETTING_GROUPS},
                "runtime": dataclasses.asdict(self.runtime or RuntimeConfig()), "batch_size": self.batch_size}

    @property
    def timings_(self) -> StageTimer:
        """Seconds per stage (clip, vae, unet, maps, memory, fusion), summed over calls; for benchmarks."""
        if not hasattr(self, "_timer"):
            self._timer = StageTimer()
        return self._timer

    def _branches(self) -> tuple[PatchClip, MapDiff]:
        if not hasattr(self, "_built"):
            config, runtime = self.config, self.runtime or RuntimeConfig()
            self._built = (PatchClip(cache.clip_encoder(config.clip, runtime), config.patchclip, config.prompts),
                           MapDiff(cache.diffusion_encoder(config.diffusion, runtime), config.mapdiff, config.prompts))
        return self._built

    def bank_settings(self) -> dict[str, Any]:
        """What a memory bank must agree on with this detector to be usable by it."""
        config = self.config
        patchclip, mapdiff = self._branches()
        return {
            "clip_model": patchclip.encoder.model_id,
            "clip_image_size": list(patchclip.encoder.image_size),
            "clip_visual_blocks": list(config.patchclip.visual_blocks),
            "diffusion_model": mapdiff.encoder.model_id,
            "diffusion_image_size": config.diffusion.image_size,
            "timestep": config.diffusion.timestep,
            "noise_seed": config.diffusion.noise_seed,
            "feature_blocks": list(config.diffusion.feature_blocks),
            "feature_prompt": [config.mapdiff.template, " or ".join(config.mapdiff.normal_words
                                                                     + config.mapdiff.anomalous_words)
                               if config.mapdiff.joint_prompt else config.mapdiff.normal_words[0]],
        }

    # --- learning ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def fit(self, images: Images, category: str, reference_names: Sequence[str] | None = None) -> CLIPFusion:
        """Build the CLIP and diffusion memory banks from ``images``, normal images of ``category``
        (paths, PIL images or arrays, one or a list: ``clipfusion.images``)."""
        images = as_rgb_list(images)
        if len(images) == 0:
            raise ClipfusionError("fit needs at least one normal image")
        patchclip, mapdiff = self._branches()
        bank = MemoryBank(manifest={**self.bank_settings(), "category": category, "k": len(images),
                                    "references": list(reference_names or [])})
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            for block, tokens in patchclip.run(batch, category).visual_tokens.items():
                bank.add(f"clip/block{block}", tokens)
            for block, grid in mapdiff.reference_features(batch, category).items():
                bank.add(f"diffusion/up{block}", grid.permute(0, 2, 3, 1))
        self.memory_bank_ = bank
        self.category_ = category
        return self

    def save_memory(self, path: str | Path) -> Path:
        if not hasattr(self, "memory_bank_"):
            raise ClipfusionError("nothing to save: fit the detector on normal images first")
        return self.memory_bank_.save(path)

    def load_memory(self, path: str | Path) -> CLIPFusion:
        bank = MemoryBank.load(path)
        bank.check_compatible(self.bank_settings(), source=str(path))
        config = self.config
        bank.check_layers([f"clip/block{b}" for b in config.patchclip.visual_blocks]
                          + [f"diffusion/up{b}" for b in config.diffusion.feature_blocks], source=str(path))
        self.memory_bank_ = bank
        self.category_ = str(bank.manifest.get("category"))
        return self

    # --- inference --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: Images, category: str) -> BranchMaps:
        """The expensive part of ``predict``: every branch map of ``images`` on its own grid."""
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
                    clip_visual = patchclip.visual_map(clip_out.visual_tokens, self.memory_bank_, neighbours).cpu()
                    diff_visual = mapdiff.visual_map(diff_out.features, self.memory_bank_, neighbours).cpu()
            parts.append(BranchMaps(clip_score=clip_out.image_score.cpu(), clip_language=clip_out.language_map.cpu(),
                                    diff_language=diff_out.language_map.cpu(), clip_visual=clip_visual,
                                    diff_visual=diff_visual))
        return BranchMaps.concat(parts)

    def fuse(self, maps: BranchMaps, fusion: FusionConfig | None = None) -> Prediction:
        """Fuse branch maps from :meth:`encode`; pass another FusionConfig to sweep α, σ... for free."""
        with self.timings_("fusion"):
            return fuse(maps, fusion or self.config.fusion)

    def predict(self, images: Images, category: str) -> Prediction:
        """Image scores (N,) and pixel maps (N, S, S) at the fusion output size; higher = more anomalous.
        ``prediction.maps_at_input_size()`` gives each map at its image's own size."""
        images = as_rgb_list(images)
        if len(images) == 0:
            raise ClipfusionError("predict needs at least one image")
        prediction = self.fuse(self.encode(images, category))
        prediction.input_sizes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
        return prediction
