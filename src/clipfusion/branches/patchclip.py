"""PatchCLIP: CLIP's anomaly maps and image score.

language map M_clip_L: per patch, P(anomalous) of its text-aligned embedding against the
normal/anomalous prompt prototypes (the embedding depends on ``dense_mode``).
visual map M_clip_V (few-shot): per patch, ½(1 − cos) to the nearest reference patch token of
the same block, averaged over ``visual_blocks``.
image score s_clip: P(anomalous) of the global image embedding.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipfusion.branches.common import state_probability
from clipfusion.branches.windows import harmonic_aggregate, harmonic_mean, window_indices
from clipfusion.config import DENSE_MODES, PatchClipConfig
from clipfusion.encoders.clip import ClipEncoder
from clipfusion.errors import SettingError
from clipfusion.grids import tokens_to_grid
from clipfusion.memory import MemoryBank
from clipfusion.prompts import state_ensembles


@dataclass
class PatchClipOutput:
    """language_map: (B, h, w) in [0, 1]; image_score: (B,); visual_tokens: {block: (B, h*w, C)}."""

    language_map: torch.Tensor
    image_score: torch.Tensor
    visual_tokens: dict[int, torch.Tensor]


def window_embeddings(encoder: ClipEncoder, pixels: torch.Tensor, scales: Sequence[int]) -> dict[int, torch.Tensor]:
    """{scale: (B, W, D)} normalised class-token embeddings of every scale×scale window of patches."""
    embeddings = encoder.token_embeddings(pixels)
    return {scale: encoder.encode_token_subsets(embeddings, window_indices(encoder.grid_size, scale))
            for scale in scales}


def window_zero_shot_map(encoder: ClipEncoder, windows: dict[int, torch.Tensor], prototypes: torch.Tensor,
                         image_score: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, h*w): WinCLIP's zero-shot map.

    Per scale, each window's P(anomalous) is spread to the patches it covers by harmonic
    aggregation; the result is the harmonic mean of the image-scale score and every scale's map.
    """
    n_patches = encoder.grid_size[0] * encoder.grid_size[1]
    maps = [image_score[:, None].expand(-1, n_patches)]
    for scale, embedded in windows.items():
        scores = state_probability(embedded, prototypes, temperature)
        maps.append(harmonic_aggregate(scores, window_indices(encoder.grid_size, scale), n_patches))
    return harmonic_mean(maps)


class PatchClip:
    def __init__(self, encoder: ClipEncoder, config: PatchClipConfig) -> None:
        self.encoder = encoder
        self.config = config
        self._prototypes: dict[str, torch.Tensor] = {}

    def prototypes(self, category: str) -> torch.Tensor:
        """(2, D) [normal, anomalous] text prototypes of the category's prompt ensembles (cached)."""
        if category not in self._prototypes:
            ensembles = state_ensembles(category, broken=self.config.broken_prompt)
            self._prototypes[category] = self.encoder.encode_prompt_ensembles(ensembles)
        return self._prototypes[category]

    @torch.inference_mode()
    def run(self, images: Sequence[np.ndarray], category: str) -> PatchClipOutput:
        encoder, config = self.encoder, self.config
        prototypes = self.prototypes(category)
        pixels = encoder.preprocess(images)
        mode = config.dense_mode
        out = encoder.encode_image(pixels, blocks=sorted(set(config.visual_blocks) | {-1}), dense=mode == "vv")
        image_score = state_probability(out.global_embedding, prototypes, config.temperature)
        if mode == "vv":
            language = state_probability(out.dense_embedding, prototypes, config.temperature)
        elif mode == "raw":
            visual = encoder.model.visual
            projected = torch.nn.functional.normalize(visual.ln_post(out.patch_tokens[-1]) @ visual.proj, dim=-1)
            language = state_probability(projected, prototypes, config.temperature)
        elif mode == "window":
            windows = window_embeddings(encoder, pixels, config.window_scales)
            language = window_zero_shot_map(encoder, windows, prototypes, image_score, config.temperature)
        elif mode == "tile":
            return PatchClipOutput(self._tile_map(images, prototypes), image_score, self._visual(out))
        else:
            raise SettingError(f"patchclip__dense_mode must be one of {', '.join(DENSE_MODES)}, not {mode!r}")
        grid = tokens_to_grid(language[..., None], encoder.grid_size)[:, 0]
        return PatchClipOutput(grid, image_score, self._visual(out))

    def _visual(self, out) -> dict[int, torch.Tensor]:
        return {block: out.patch_tokens[block] for block in self.config.visual_blocks}

    def _tile_map(self, images: Sequence[np.ndarray], prototypes: torch.Tensor) -> torch.Tensor:
        """(B, n, n): class-token P(anomalous) of each of the n×n crops, each resized to CLIP's input."""
        n = self.config.tile_grid
        crops = []
        for image in images:
            rows = np.array_split(np.arange(image.shape[0]), n)
            cols = np.array_split(np.arange(image.shape[1]), n)
            crops += [image[r[0]:r[-1] + 1, c[0]:c[-1] + 1] for r in rows for c in cols]
        embedded = self.encoder.encode_image(self.encoder.preprocess(crops), dense=False).global_embedding
        return state_probability(embedded, prototypes, self.config.temperature).view(len(images), n, n)

    def visual_map(self, visual_tokens: dict[int, torch.Tensor], bank: MemoryBank) -> torch.Tensor:
        """(B, h, w): nearest-reference distance per patch, averaged over the visual blocks."""
        maps = [bank.distance(f"clip/block{block}", tokens) for block, tokens in visual_tokens.items()]
        return tokens_to_grid(torch.stack(maps).mean(dim=0)[..., None], self.encoder.grid_size)[:, 0]
