"""WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023) on the same CLIP encoder, for side-by-side comparison.

Zero-shot: the harmonic mean of the image-scale score and, per window scale, the harmonic
aggregation of every window's P(anomalous).  Few-shot (WinCLIP+): per patch, ½(1 − cos) to the
nearest reference feature, for the full-resolution patch tokens and for each scale's window
embeddings (aggregated to patches harmonically), averaged; map = (zero-shot + few-shot) / 2,
image score = (image-scale score + max few-shot map) / 2.  Maps are upsampled bilinearly to
``output_size``; no smoothing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from clipfusion.config import ClipConfig, Preset, RuntimeConfig, get_preset
from clipfusion.encoders import cache
from clipfusion.encoders.clip import ClipEncoder, state_probability
from clipfusion.errors import ClipfusionError
from clipfusion.geometry import resize_grid, tokens_to_grid, window_indices
from clipfusion.images import Images, as_rgb_list
from clipfusion.methods.estimator import Estimator
from clipfusion.methods.memory import MemoryBank
from clipfusion.methods.windows import harmonic_aggregate, window_zero_shot_map
from clipfusion.prompts import state_ensembles
from clipfusion.protocol import Prediction
from clipfusion.timing import StageTimer


class WinCLIP(Estimator):
    """WinCLIP (zero-shot) and, once fitted on normal images, WinCLIP+; see the module docstring.
    ``get_params()`` gives the constructor's arguments; ``describe()`` the settings in full."""

    def __init__(self, preset: str | Preset = "paper-recon", runtime: RuntimeConfig | None = None,
                 scales: Sequence[int] = (2, 3), temperature: float = 0.07, output_size: int = 256,
                 batch_size: int = 8) -> None:
        self.preset = preset
        self.runtime = runtime
        self.scales = tuple(scales)
        self.temperature = temperature
        self.output_size = output_size
        self.batch_size = batch_size

    @property
    def config(self) -> Preset:
        """The preset WinCLIP reads its CLIP model and object names from."""
        return get_preset(self.preset) if isinstance(self.preset, str) else self.preset

    @property
    def clip_config(self) -> ClipConfig:
        return self.config.clip

    def describe(self) -> dict[str, Any]:
        """The settings in full: the preset's CLIP and prompts expanded."""
        name = self.preset if isinstance(self.preset, str) else self.preset.name
        return {"preset": name, "clip": dataclasses.asdict(self.clip_config),
                "prompts": dataclasses.asdict(self.config.prompts), "scales": list(self.scales),
                "temperature": self.temperature, "output_size": self.output_size, "batch_size": self.batch_size}

    @property
    def encoder(self) -> ClipEncoder:
        return cache.clip_encoder(self.clip_config, self.runtime or RuntimeConfig())

    @property
    def precision(self) -> str:
        """The dtype CLIP runs in (``auto`` resolved), as rows and reports name it."""
        return (self.runtime or RuntimeConfig()).resolved()[0].dtype

    @property
    def timings_(self) -> StageTimer:
        """Seconds per stage (clip, windows, maps, memory, fusion), summed over calls; for benchmarks."""
        if not hasattr(self, "_timer"):
            self._timer = StageTimer()
        return self._timer

    @torch.inference_mode()
    def _features(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Global embeddings (B, D), final patch tokens after ln_post (B, N, C), window embeddings per scale."""
        encoder = self.encoder
        with self.timings_("clip"):
            pixels = encoder.preprocess(images)
            out = encoder.encode_image(pixels, blocks=[-1], dense=False)
            tokens = encoder.final_patch_tokens(out.patch_tokens[-1])
        with self.timings_("windows"):
            windows = encoder.window_embeddings(pixels, self.scales)
        return out.global_embedding, tokens, windows

    @torch.inference_mode()
    def fit(self, images: Images, category: str | None = None) -> WinCLIP:
        category = self._category(category)
        images = as_rgb_list(images)
        if len(images) == 0:
            raise ClipfusionError("fit needs at least one normal image")
        bank = MemoryBank(manifest={"category": category, "k": len(images)})
        for start in range(0, len(images), self.batch_size):
            _, tokens, windows = self._features(images[start:start + self.batch_size])
            bank.add("patch", tokens)
            for scale, embedded in windows.items():
                bank.add(f"window{scale}", embedded)
        self.memory_bank_ = bank
        self.category_ = category
        return self

    @torch.inference_mode()
    def predict(self, images: Images, category: str | None = None) -> Prediction:
        category = self._category(category)
        images = as_rgb_list(images)
        encoder = self.encoder
        prototypes = encoder.encode_prompt_ensembles(state_ensembles(self.config.prompts.name_of(category)))
        n_patches = encoder.grid_size[0] * encoder.grid_size[1]
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            global_embedding, tokens, windows = self._features(images[start:start + self.batch_size])
            with self.timings_("maps"):
                image_score = state_probability(global_embedding, prototypes, self.temperature)
                zero_shot = window_zero_shot_map(encoder.grid_size, windows, prototypes, image_score, self.temperature)
            anomaly_map, score = zero_shot, image_score
            if hasattr(self, "memory_bank_"):
                with self.timings_("memory"):
                    few_shot = [self.memory_bank_.distance("patch", tokens)]
                    for scale, embedded in windows.items():
                        distance = self.memory_bank_.distance(f"window{scale}", embedded)
                        few_shot.append(harmonic_aggregate(distance, window_indices(encoder.grid_size, scale),
                                                           n_patches))
                    visual = torch.stack(few_shot).mean(dim=0)
                anomaly_map = (zero_shot + visual) / 2
                score = (image_score + visual.amax(dim=1)) / 2
            with self.timings_("fusion"):
                grid = tokens_to_grid(anomaly_map[..., None], encoder.grid_size)[:, 0]
                maps.append(resize_grid(grid, (self.output_size, self.output_size)).cpu())
            scores.append(score.cpu())
        return Prediction(scores=torch.cat(scores).numpy(), maps=torch.cat(maps).numpy(),
                          input_sizes=[(int(image.shape[0]), int(image.shape[1])) for image in images])
