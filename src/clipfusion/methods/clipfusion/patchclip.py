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

from clipfusion.config import DENSE_MODES, PatchClipConfig, PromptConfig
from clipfusion.encoders.clip import ClipEncoder, ClipImageOutput, state_probability
from clipfusion.errors import SettingError
from clipfusion.geometry import tokens_to_grid
from clipfusion.methods.memory import MemoryBank
from clipfusion.methods.windows import window_zero_shot_map
from clipfusion.prompts import state_ensembles


@dataclass
class PatchClipOutput:
    """language_map: (B, h, w) in [0, 1]; image_score: (B,); visual_tokens: {block: (B, h*w, C)}."""

    language_map: torch.Tensor
    image_score: torch.Tensor
    visual_tokens: dict[int, torch.Tensor]


class PatchClip:
    """The CLIP branch: text prototypes per category (cached), the language map and s_clip from one
    pass of the image tower, patch tokens for the memory bank, and the visual map against it."""

    def __init__(self, encoder: ClipEncoder, config: PatchClipConfig, prompts: PromptConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config
        self.prompts = prompts or PromptConfig()
        self._prototypes: dict[str, torch.Tensor] = {}

    def prototypes(self, category: str) -> torch.Tensor:
        """(2, D) [normal, anomalous] text prototypes of the category's prompt ensembles (cached)."""
        if category not in self._prototypes:
            ensembles = state_ensembles(self.prompts.name_of(category), broken=self.config.broken_prompt)
            self._prototypes[category] = self.encoder.encode_prompt_ensembles(ensembles)
        return self._prototypes[category]

    @torch.inference_mode()
    def run(self, images: Sequence[np.ndarray], category: str) -> PatchClipOutput:
        if self.config.dense_mode == "tile":
            out = self.encoder.encode_image(self.encoder.preprocess(images), blocks=self._blocks(), dense=False)
            prototypes = self.prototypes(category)
            return PatchClipOutput(self._tile_map(images, prototypes), self._score(out, prototypes), self._visual(out))
        return self.run_pixels(self.encoder.preprocess(images), self.prototypes(category))

    def _blocks(self) -> list[int]:
        return sorted(set(self.config.visual_blocks) | {-1})

    def _score(self, out: ClipImageOutput, prototypes: torch.Tensor) -> torch.Tensor:
        return state_probability(out.global_embedding, prototypes, self.config.temperature)

    def run_pixels(self, pixels: torch.Tensor, prototypes: torch.Tensor) -> PatchClipOutput:
        """The branch on preprocessed ``pixels`` (B, 3, S, S) with the category's (2, D) ``prototypes``: one
        pass of the image tower (every dense mode but ``tile``, which needs the images).  Traceable: it is
        what ``clipfusion export`` writes as the CLIP graph."""
        encoder, config = self.encoder, self.config
        mode = config.dense_mode
        out = encoder.encode_image(pixels, blocks=self._blocks(), dense=mode == "vv")
        image_score = self._score(out, prototypes)
        if mode == "vv":
            assert out.dense_embedding is not None  # asked for with dense=True
            language = state_probability(out.dense_embedding, prototypes, config.temperature)
        elif mode == "raw":
            projected = encoder.final_patch_tokens(out.patch_tokens[-1], project=True)
            language = state_probability(projected, prototypes, config.temperature)
        elif mode == "window":
            windows = encoder.window_embeddings(pixels, config.window_scales)
            language = window_zero_shot_map(encoder.grid_size, windows, prototypes, image_score, config.temperature)
        else:
            raise SettingError(f"patchclip__dense_mode must be one of {', '.join(DENSE_MODES)}, not {mode!r}")
        grid = tokens_to_grid(language[..., None], encoder.grid_size)[:, 0]
        return PatchClipOutput(grid, image_score, self._visual(out))

    def _visual(self, out: ClipImageOutput) -> dict[int, torch.Tensor]:
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
        probability = state_probability(embedded, prototypes, self.config.temperature)  # (B*n*n,), crops row-major
        return tokens_to_grid(probability.reshape(len(images), n * n, 1), (n, n))[:, 0]

    def visual_map(self, visual_tokens: dict[int, torch.Tensor], bank: MemoryBank, neighbours: int = 1
                   ) -> torch.Tensor:
        """(B, h, w): nearest-reference distance per patch, averaged over the visual blocks."""
        maps = [bank.distance(f"clip/block{block}", tokens, neighbours) for block, tokens in visual_tokens.items()]
        return tokens_to_grid(torch.stack(maps).mean(dim=0)[..., None], self.encoder.grid_size)[:, 0]
