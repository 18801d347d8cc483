"""Stable Diffusion as a feature extractor: one noised UNet pass, cross-attention and features read out.

Per call: VAE-encode the images → add DDPM forward noise at timestep ``t`` (one seeded draw shared by
all images) → **one** UNet forward with every prompt in the same batch (no classifier-free
guidance, no sampling loop).  Chosen ``attn2`` (cross-attention) layers get a capturing processor
that computes the probabilities explicitly, averages heads and keeps only the requested token
columns as they come out; every other layer keeps its fast (SDPA) processor, so self-attention
probabilities are never built.  Up-block outputs are read with forward hooks removed after the call,
and the UNet stops as soon as the last block any output needs has run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from clipfusion.config import DiffusionConfig, RuntimeConfig
from clipfusion.encoders.attention import (
    CaptureState,
    CrossAttnCaptureProcessor,
    layer_order,
    select_cross_attention_layers,
)
from clipfusion.encoders.loading import DiffusionParts, load_diffusion
from clipfusion.errors import SettingError
from clipfusion.geometry import resize_image, tokens_to_grid
from clipfusion.timing import StageTimer


@dataclass
class DiffusionOutput:
    """cross_attn_maps: {layer: (B, P, T, h, w)} float32 attention probability of each selected token
    (T tokens; all 77 when no selection) at each position of the layer's grid, averaged over heads.
    features: {up-block index: (B, P, C, h, w)} float32 outputs of the chosen up-blocks.
    B images × P prompts; grids row-major, at the layer's own resolution."""

    cross_attn_maps: dict[str, torch.Tensor]
    features: dict[int, torch.Tensor]


class _StopUNet(Exception):
    """Raised by a hook once the last needed block has run (caught by the encoder)."""


class DiffusionEncoder:
    """A Stable Diffusion UNet (diffusers) read as a feature extractor; see the module docstring."""

    def __init__(self, parts: DiffusionParts, config: DiffusionConfig) -> None:
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.scheduler, self.model_id = parts.tokenizer, parts.scheduler, parts.model_id
        self.config = config
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vae_dtype = next(self.vae.parameters()).dtype  # differs from dtype with diffusion__vae_dtype
        vae_config = self.vae.config
        vae_channels = getattr(vae_config, "block_out_channels", None) or vae_config.encoder_block_out_channels
        self.vae_scale_factor = 2 ** (len(vae_channels) - 1)
        self.latent_size = config.image_size // self.vae_scale_factor
        self.layer_names = select_cross_attention_layers(self.unet, config.cross_attn_factors, config.cross_attn_places)
        for block in config.feature_blocks:
            if not 0 <= block < len(self.unet.up_blocks):
                raise SettingError(f"feature block {block} out of range: {len(self.unet.up_blocks)} up-blocks")
        self._state = CaptureState()
        self._processors = {}
        for key, processor in self.unet.attn_processors.items():
            name = key.removesuffix(".processor")
            if name in self.layer_names:
                processor = CrossAttnCaptureProcessor(name, self._state)
            elif isinstance(processor, CrossAttnCaptureProcessor):  # left by another encoder of the same UNet
                processor = AttnProcessor2_0()
            self._processors[key] = processor
        self.unet.set_attn_processor(dict(self._processors))
        # the naive reference: the plain processor, probabilities materialised, in every other layer
        self._naive_processors = {key: processor if isinstance(processor, CrossAttnCaptureProcessor)
                                  else AttnProcessor() for key, processor in self._processors.items()}
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self._noise: dict[tuple[int, ...], torch.Tensor] = {}  # (draw, *latent shape) → (1, 4, h, w)

    @classmethod
    def from_config(cls, config: DiffusionConfig, runtime: RuntimeConfig | None = None) -> DiffusionEncoder:
        return cls(load_diffusion(config, runtime or RuntimeConfig()), config)

    # --- inputs ----------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 images → (B, 3, S, S) in [-1, 1] (bicubic resize of the whole image), in the VAE's dtype."""
        size = (self.config.image_size, self.config.image_size)
        resized = np.stack([resize_image(image, size) for image in images])
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return pixels.to(device=self.device, dtype=self.vae_dtype)

    @torch.inference_mode()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 4, S/8, S/8) latents z0 in the UNet's dtype, scaled by the VAE's scaling factor
        (mean, no sampling)."""
        encoded = self.vae.encode(pixels.to(self.vae_dtype))
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    def noised(self, latents: torch.Tensor, draw: int = 0) -> torch.Tensor:
        """z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε at the absolute timestep t, with one ε (seed noise_seed + draw) for
        every image, so that queries and references are noised alike."""
        key = (draw, *latents.shape[1:])
        if key not in self._noise:
            generator = torch.Generator(device="cpu").manual_seed(self.config.noise_seed + draw)
            self._noise[key] = torch.randn((1, *latents.shape[1:]), generator=generator)
        noise = self._noise[key].to(device=latents.device, dtype=latents.dtype).expand_as(latents)
        timesteps = torch.full((latents.shape[0],), self.config.timestep, dtype=torch.long, device=latents.device)
        return self.scheduler.add_noise(latents, noise, timesteps)

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, 77, D) text-encoder hidden states, cached per prompt list."""
        key = tuple(prompts)
        if key not in self._text_cache:
            tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(self.device)
            self._text_cache[key] = self.text_encoder(tokens)[0]
        return self._text_cache[key]

    def word_token_indices(self, prompt: str, word: str) -> list[int]:
        """Positions of ``word``'s tokens in ``prompt`` as the UNet sees it (index 0 is the start token).

        A word the tokenizer splits into several tokens gives several positions.
        """
        ids = self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
        word_ids = self.tokenizer(word, add_special_tokens=False).input_ids
        for start in range(len(ids) - len(word_ids) + 1):
            if ids[start:start + len(word_ids)] == word_ids:
                return list(range(start, start + len(word_ids)))
        raise SettingError(f"word {word!r} does not occur in prompt {prompt!r}")

    # --- the pass --------------------------------------------------------------------------------

    def _stop_module(self, feature_blocks: Sequence[int]) -> str:
        needed = list(self.layer_names) + [f"up_blocks.{b}" for b in feature_blocks]
        return max(needed, key=layer_order)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, prompts: Sequence[str], token_indices: Sequence[int] | None = None,
               feature_blocks: Sequence[int] | None = None, stop_early: bool = True,
               timer: StageTimer | None = None) -> DiffusionOutput:
        """VAE encode, then one UNet pass for B images × P prompts (see :meth:`run_unet`); ``timer``
        is charged ``vae`` and ``unet``.  With ``config.naive`` the same outputs come the slow way
        (:meth:`encode_naive`, all of it charged to ``unet``)."""
        timer = timer or StageTimer()
        if self.config.naive:
            with timer("unet"):
                return self.encode_naive(pixels, prompts, token_indices, feature_blocks)
        with timer("vae"):
            latents = self.encode_latents(pixels)
        with timer("unet"):
            return self.run_unet(latents, prompts, token_indices, feature_blocks, stop_early)

    def encode_naive(self, pixels: torch.Tensor, prompts: Sequence[str], token_indices: Sequence[int] | None = None,
                     feature_blocks: Sequence[int] | None = None) -> DiffusionOutput:
        """The reference computation: per prompt, its own VAE encode and a full UNet pass with
        probabilities built in every attention layer.  Same outputs as :meth:`encode`, much slower."""
        outputs = [self.run_unet(self.encode_latents(pixels), [prompt], token_indices, feature_blocks,
                                 stop_early=False, processors=self._naive_processors) for prompt in prompts]
        return DiffusionOutput(
            cross_attn_maps={name: torch.cat([o.cross_attn_maps[name] for o in outputs], dim=1)
                             for name in outputs[0].cross_attn_maps},
            features={block: torch.cat([o.features[block] for o in outputs], dim=1) for block in outputs[0].features},
        )

    @torch.inference_mode()
    def run_unet(
        self,
        latents: torch.Tensor,
        prompts: Sequence[str],
        token_indices: Sequence[int] | None = None,
        feature_blocks: Sequence[int] | None = None,
        stop_early: bool = True,
        processors: dict | None = None,
    ) -> DiffusionOutput:
        """One UNet pass over noised ``latents`` (B, 4, h, w) for every prompt, per noise draw; with
        ``noise_draws`` > 1 the maps and features are averaged over the draws.

        token_indices: token columns to keep in the attention maps (the same positions for every
        prompt), None for all 77.  feature_blocks: up-blocks to capture (default: the config's).
        stop_early: skip every block after the last one needed (off only to check it changes nothing).
        """
        draws = [self._one_pass(self.noised(latents, draw), prompts, token_indices, feature_blocks, stop_early,
                                processors) for draw in range(self.config.noise_draws)]
        if len(draws) == 1:
            return draws[0]
        return DiffusionOutput(
            cross_attn_maps={name: torch.stack([d.cross_attn_maps[name] for d in draws]).mean(dim=0)
                             for name in draws[0].cross_attn_maps},
            features={block: torch.stack([d.features[block] for d in draws]).mean(dim=0)
                      for block in draws[0].features},
        )

    def _one_pass(self, noised: torch.Tensor, prompts: Sequence[str], token_indices: Sequence[int] | None,
                  feature_blocks: Sequence[int] | None, stop_early: bool, processors: dict | None) -> DiffusionOutput:
        feature_blocks = list(self.config.feature_blocks if feature_blocks is None else feature_blocks)
        n_images, n_prompts = noised.shape[0], len(prompts)
        latents = noised.repeat_interleave(n_prompts, dim=0)
        context = self.encode_prompts(prompts).repeat(n_images, 1, 1)  # row b·P + p: image b, prompt p
        timesteps = torch.full((latents.shape[0],), self.config.timestep, dtype=torch.long, device=self.device)

        features: dict[int, torch.Tensor] = {}
        modules = dict(self.unet.named_modules())
        handles = [
            self.unet.up_blocks[block].register_forward_hook(
                lambda _m, _i, output, block=block: features.__setitem__(block, output.float()))
            for block in feature_blocks
        ]
        if stop_early:
            handles.append(modules[self._stop_module(feature_blocks)].register_forward_hook(self._raise_stop))
        self.unet.set_attn_processor(dict(processors or self._processors))  # the UNet may be shared
        self._state.token_indices = None if token_indices is None else list(token_indices)
        self._state.maps = {}
        self._state.active = True
        try:
            self.unet(latents, timesteps, encoder_hidden_states=context)
        except _StopUNet:
            pass
        finally:
            self._state.active = False
            for handle in handles:
                handle.remove()
        maps = {name: self._to_grid(probs, n_images, n_prompts) for name, probs in self._state.maps.items()}
        self._state.maps = {}
        return DiffusionOutput(
            cross_attn_maps=maps,
            features={b: f.reshape(n_images, n_prompts, *f.shape[1:]) for b, f in sorted(features.items())},
        )

    @staticmethod
    def _raise_stop(*_args: object) -> None:
        raise _StopUNet

    def _to_grid(self, probs: torch.Tensor, n_images: int, n_prompts: int) -> torch.Tensor:
        """(B·P, Q, T) → (B, P, T, h, w) on the square latent grid of that layer."""
        side = math.isqrt(probs.shape[1])
        grid = tokens_to_grid(probs, (side, side))
        return grid.reshape(n_images, n_prompts, *grid.shape[1:])
