"""MapDiff: Stable Diffusion's anomaly maps from one noised UNet pass.

language map M_diff_L: cross-attention of the UNet on anomalous-state words (A_a) against
normal-state words (A_n), per latent position, averaged over the chosen layers (each upsampled to
the latent grid first) and over the words of each state; default rule A_a / (A_a + A_n).
visual map M_diff_V (few-shot): per position, ½(1 − cos) of the up-block features (normal prompt)
to the nearest reference feature of the same block, upsampled to the finest block and averaged.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipfusion.config import MapDiffConfig, PromptConfig
from clipfusion.encoders.diffusion import DiffusionEncoder, DiffusionOutput
from clipfusion.geometry import grid_to_tokens, resize_grid, tokens_to_grid
from clipfusion.methods.memory import MemoryBank
from clipfusion.timing import StageTimer


@dataclass
class StatePrompts:
    """The UNet's prompts and where each state word sits in them.

    prompts: one per word (normal words first), or a single joint prompt holding every word.
    words: (prompt index, token positions) per word, normal words first; n_normal: how many are normal.
    """

    prompts: list[str]
    n_normal: int
    words: list[tuple[int, list[int]]]


@dataclass
class MapDiffOutput:
    """language_map: (B, H, W) on the latent grid, in [0, 1]; features: {up-block: (B, C, h, w)}."""

    language_map: torch.Tensor
    features: dict[int, torch.Tensor]


class MapDiff:
    """The diffusion branch: state prompts per category (cached), the language map from one UNet pass,
    reference features for the memory bank, and the visual map against it."""

    def __init__(self, encoder: DiffusionEncoder, config: MapDiffConfig, prompts: PromptConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config
        self.prompts = prompts or PromptConfig()
        self._state_prompts: dict[str, StatePrompts] = {}

    def state_prompts(self, category: str) -> StatePrompts:
        if category not in self._state_prompts:
            name = self.prompts.name_of(category)
            words = list(self.config.normal_words) + list(self.config.anomalous_words)
            if self.config.joint_prompt:  # one UNet row: the state words compete in one softmax
                prompts = [self.config.template.format(state=" or ".join(words), name=name)]
                located = [(0, self.encoder.word_token_indices(prompts[0], word)) for word in words]
            else:
                prompts = [self.config.template.format(state=word, name=name) for word in words]
                located = [(i, self.encoder.word_token_indices(p, w))
                           for i, (p, w) in enumerate(zip(prompts, words, strict=True))]
            self._state_prompts[category] = StatePrompts(prompts, len(self.config.normal_words), located)
        return self._state_prompts[category]

    @torch.inference_mode()
    def run(self, images: Sequence[np.ndarray], category: str, with_features: bool = False,
            timer: StageTimer | None = None) -> MapDiffOutput:
        encoder = self.encoder
        timer = timer or StageTimer()
        state = self.state_prompts(category)
        columns = self.columns(state)
        feature_blocks = encoder.config.feature_blocks if with_features else []
        out = encoder.encode(encoder.preprocess(images), state.prompts, columns, feature_blocks, timer=timer)
        with timer("maps"):
            return self.read_out(out, state, columns)

    def run_latents(self, latents: torch.Tensor, category: str, with_features: bool = False) -> MapDiffOutput:
        """The branch on VAE latents ``latents`` (B, 4, h, w) (:meth:`DiffusionEncoder.encode_latents`): noise,
        the partial UNet pass and the read-out.  Traceable: it is what ``clipfusion export`` writes as the
        diffusion graph (the text side, cached by then, becomes constants)."""
        state = self.state_prompts(category)
        columns = self.columns(state)
        feature_blocks = self.encoder.config.feature_blocks if with_features else []
        out = self.encoder.run_unet(latents, state.prompts, columns, feature_blocks)
        return self.read_out(out, state, columns)

    @staticmethod
    def columns(state: StatePrompts) -> list[int]:
        """The token columns the UNet pass keeps: every state word's positions, sorted."""
        return sorted({i for _, positions in state.words for i in positions})

    def read_out(self, out: DiffusionOutput, state: StatePrompts, columns: list[int]) -> MapDiffOutput:
        """The language map from the captured attention (per word: its columns, every layer on the latent
        grid, averaged) and the features of the first (normal or joint) prompt."""
        latent = (self.encoder.latent_size, self.encoder.latent_size)
        per_word = []
        for p, positions in state.words:
            keep = [columns.index(i) for i in positions]
            layers = [resize_grid(maps[:, p, keep].mean(dim=1), latent) for maps in out.cross_attn_maps.values()]
            per_word.append(torch.stack(layers).mean(dim=0))  # (B, H, W) attention mass on the word
        normal = torch.stack(per_word[:state.n_normal]).mean(dim=0)
        anomalous = torch.stack(per_word[state.n_normal:]).mean(dim=0)
        features = {block: f[:, 0] for block, f in out.features.items()}
        return MapDiffOutput(self._rule(anomalous, normal), features)

    @torch.inference_mode()
    def reference_features(self, images: Sequence[np.ndarray], category: str) -> dict[int, torch.Tensor]:
        """{up-block: (B, C, h, w)} of normal references: only the prompt the features come from is run,
        so a reference costs one UNet row, not one per state word.  Compiled, references run the queries'
        pass instead (every prompt, every word's columns): one compiled graph then serves both, and a
        second compile costs minutes where the extra rows of k references cost seconds."""
        encoder = self.encoder
        state = self.state_prompts(category)
        pixels = encoder.preprocess(images)
        if encoder.compiled:
            out = encoder.encode(pixels, state.prompts, self.columns(state), encoder.config.feature_blocks)
        else:
            out = encoder.encode(pixels, [state.prompts[0]], token_indices=state.words[0][1])
        return {block: f[:, 0] for block, f in out.features.items()}

    def _rule(self, anomalous: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        if self.config.attention_rule == "ratio":
            return anomalous / (anomalous + normal + 1e-8)
        if self.config.attention_rule == "anomalous":
            return anomalous
        return (anomalous - normal + 1.0) / 2.0

    def visual_map(self, features: dict[int, torch.Tensor], bank: MemoryBank, neighbours: int = 1) -> torch.Tensor:
        """(B, H, W) at the finest feature grid: nearest-reference distance averaged over blocks."""
        height, width = max((tuple(f.shape[-2:]) for f in features.values()), key=lambda s: s[0] * s[1])
        maps = []
        for block, grid in features.items():
            distance = bank.distance(f"diffusion/up{block}", grid_to_tokens(grid), neighbours)
            on_grid = tokens_to_grid(distance[..., None], (grid.shape[-2], grid.shape[-1]))[:, 0]  # (B, h, w)
            maps.append(resize_grid(on_grid, (height, width)))
        return torch.stack(maps).mean(dim=0)
