"""Stable Diffusion as a feature extractor: one noised UNet pass, cross-attention and features read out.

Per call: VAE-encode the images → add DDPM forward noise at timestep ``t`` (one seeded draw shared by
all images) → **one** UNet forward with every prompt in the same batch (no classifier-free
guidance, no sampling loop).  Chosen ``attn2`` (cross-attention) layers get a capturing processor
that computes the probabilities explicitly, averages heads and keeps only the requested token
columns as they come out; every other layer keeps its fast (SDPA) processor, so self-attention
probabilities are never built.  The UNet runs through :func:`partial_unet_forward`, an explicit forward
that stops after the last block any output needs and returns the chosen up-blocks' outputs: no hooks, no
exception, so the same code traces into an exported graph (``clipfusion export``) and compiles.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from clipfusion.config import DiffusionConfig, RuntimeConfig
from clipfusion.encoders.attention import (
    CaptureState,
    CrossAttnCaptureProcessor,
    layer_order,
    select_cross_attention_layers,
)
from clipfusion.encoders.compiling import compile_for_inference, one_image_per_call
from clipfusion.encoders.loading import DiffusionParts, load_diffusion
from clipfusion.encoders.precompiled import PrecompiledParts
from clipfusion.errors import SettingError
from clipfusion.geometry import tokens_to_grid
from clipfusion.resampling import normalised_pixels
from clipfusion.timing import StageTimer

VAE_MEAN = VAE_STD = (0.5, 0.5, 0.5)  # the VAE reads pixels in [-1, 1]


@dataclass
class DiffusionOutput:
    """cross_attn_maps: {layer: (B, P, T, h, w)} float32 attention probability of each selected token
    (T tokens; all 77 when no selection) at each position of the layer's grid, averaged over heads.
    features: {up-block index: (B, P, C, h, w)} float32 outputs of the chosen up-blocks.
    B images × P prompts; grids row-major, at the layer's own resolution."""

    cross_attn_maps: dict[str, torch.Tensor]
    features: dict[int, torch.Tensor]


def unet_block_order(unet: UNet2DConditionModel) -> list[str]:
    """The UNet's top-level blocks in execution order: ``down_blocks.i``…, ``mid_block``, ``up_blocks.j``…"""
    return ([f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
            + [f"up_blocks.{j}" for j in range(len(unet.up_blocks))])


def check_partial_forward(unet: UNet2DConditionModel, latent_size: int) -> None:
    """Raise SettingError for a UNet :func:`partial_unet_forward` does not reproduce (extra conditioning)."""
    config = unet.config
    extras = {"class_embed_type": config.class_embed_type, "addition_embed_type": config.addition_embed_type,
              "encoder_hid_dim_type": config.encoder_hid_dim_type,
              "center_input_sample": config.center_input_sample or None}
    unsupported = [f"{key}={value!r}" for key, value in extras.items() if value is not None]
    if latent_size % 2 ** unet.num_upsamplers:
        unsupported.append(f"a latent side of {latent_size} (not a multiple of {2 ** unet.num_upsamplers})")
    if unsupported:
        raise SettingError(f"this UNet has {', '.join(unsupported)}: clipfusion reads Stable Diffusion 1.x/2.x UNets "
                           "conditioned on the prompt only")


def partial_unet_forward(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
                         context: torch.Tensor, last_block: str, feature_blocks: Sequence[int]
                         ) -> dict[int, torch.Tensor]:
    """diffusers' ``UNet2DConditionModel.forward`` for a text-conditioned UNet, stopped after ``last_block``.

    sample (N, 4, h, w) noised latents, timestep (N,), context (N, 77, D).  Runs the time embedding,
    ``conv_in`` and the blocks of :func:`unet_block_order` up to and including ``last_block``, and
    returns {j: output (N, C, h_j, w_j) of ``up_blocks.j``} for the ``feature_blocks`` that ran.  The
    attention processors run as usual, so capturing ones record their maps on the way.  Blocks after
    ``last_block`` (and the output head) never run: written out rather than stopped by an exception,
    so that tracing and ``torch.compile`` see one straight graph.  See :func:`check_partial_forward`.
    """
    order = unet_block_order(unet)
    stop = order.index(last_block)
    embedding = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
    if unet.time_embed_act is not None:
        embedding = unet.time_embed_act(embedding)
    hidden = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (hidden,)
    features: dict[int, torch.Tensor] = {}
    for name in order[:stop + 1]:
        place, _, index = name.partition(".")
        if place == "down_blocks":
            block = unet.down_blocks[int(index)]
            if getattr(block, "has_cross_attention", False):
                hidden, residuals = block(hidden_states=hidden, temb=embedding, encoder_hidden_states=context)
            else:
                hidden, residuals = block(hidden_states=hidden, temb=embedding)
            skips += residuals
        elif place == "mid_block":
            if unet.mid_block is None:
                continue
            if getattr(unet.mid_block, "has_cross_attention", False):
                hidden = unet.mid_block(hidden, embedding, encoder_hidden_states=context)
            else:
                hidden = unet.mid_block(hidden, embedding)
        else:
            block = unet.up_blocks[int(index)]
            taken, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=embedding, res_hidden_states_tuple=taken,
                               encoder_hidden_states=context)
            else:
                hidden = block(hidden_states=hidden, temb=embedding, res_hidden_states_tuple=taken)
            if int(index) in feature_blocks:
                features[int(index)] = hidden
    return features


def vae_latents(vae: AutoencoderKL | AutoencoderTiny, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) pixels in [-1, 1] → (B, 4, S/8, S/8) latents z0 scaled by the VAE's scaling factor:
    the mean of an ``AutoencoderKL``'s posterior (no sampling), or an ``AutoencoderTiny``'s output."""
    encoded = vae.encode(pixels)
    latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
    return latents * vae.config.scaling_factor


class DiffusionEncoder:
    """A Stable Diffusion UNet (diffusers) read as a feature extractor; see the module docstring.

    compile: run the UNet pass and the VAE encoder through :func:`compile_for_inference`, one image
    per call (``RuntimeConfig.compile``).  precompiled: run them through packages compiled ahead of time
    (:class:`PrecompiledParts`, ``RuntimeConfig.precompiled``), one image per call too."""

    def __init__(self, parts: DiffusionParts, config: DiffusionConfig, compile: bool = False,
                 precompiled: str = "off") -> None:
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.scheduler, self.model_id = parts.tokenizer, parts.scheduler, parts.model_id
        self.config = config
        self.compiled = compile or precompiled != "off"  # static shapes: one image per call
        self._unet_forward = compile_for_inference(partial_unet_forward) if compile else partial_unet_forward
        self._vae_latents = compile_for_inference(vae_latents) if compile else vae_latents
        if precompiled != "off":
            self.precompiled = PrecompiledParts(self, precompiled, partial_unet_forward, vae_latents)
            self._unet_forward, self._vae_latents = self.precompiled.unet_forward, self.precompiled.vae_latents
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vae_dtype = next(self.vae.parameters()).dtype  # differs from dtype with diffusion__vae_dtype
        vae_config = self.vae.config
        vae_channels = getattr(vae_config, "block_out_channels", None) or vae_config.encoder_block_out_channels
        self.vae_scale_factor = 2 ** (len(vae_channels) - 1)
        self.latent_size = config.image_size // self.vae_scale_factor
        check_partial_forward(self.unet, self.latent_size)
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
        runtime = runtime or RuntimeConfig()
        return cls(load_diffusion(config, runtime), config, runtime.compile, runtime.precompiled)

    # --- inputs ----------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 images → (B, 3, S, S) in [-1, 1] (bicubic resize of the whole image), in the VAE's dtype."""
        size = (self.config.image_size, self.config.image_size)
        pixels = normalised_pixels(list(images), size, VAE_MEAN, VAE_STD)
        return torch.from_numpy(pixels).to(device=self.device, dtype=self.vae_dtype)

    @torch.inference_mode()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 4, S/8, S/8) latents z0 in the UNet's dtype, scaled by the VAE's scaling factor
        (mean, no sampling).

        On a CPU the images go through one at a time, compiled or not: a batch of 8 took 1.34× as long
        per image as single images (TAESD at 256 px on a 2-core AVX2 EPYC; benchmarks/vae_batch.py),
        probably because a whole batch's full-resolution activations overflow the caches."""
        one_per_call = (self.compiled or self.device.type == "cpu") and len(pixels) > 1  # (an export traces 1)
        chunks = one_image_per_call(pixels.to(self.vae_dtype), one_per_call)
        return torch.cat([self._vae_latents(self.vae, chunk) for chunk in chunks]).to(self.dtype)

    def noised(self, latents: torch.Tensor, draw: int = 0) -> torch.Tensor:
        """z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε at the absolute timestep t, with one ε (seed noise_seed + draw) for
        every image, so that queries and references are noised alike."""
        key = (draw, *(int(side) for side in latents.shape[1:]))  # plain ints, also while tracing
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

    def last_block(self, feature_blocks: Sequence[int]) -> str:
        """The top-level UNet block (``unet_block_order``) holding the last capture any output needs."""
        needed = list(self.layer_names) + [f"up_blocks.{b}" for b in feature_blocks]
        last = max(needed, key=layer_order)
        return "mid_block" if last.startswith("mid_block") else ".".join(last.split(".")[:2])

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

        self.unet.set_attn_processor(dict(processors or self._processors))  # the UNet may be shared
        self._state.token_indices = None if token_indices is None else list(token_indices)
        self._state.maps = {}
        self._state.active = True
        try:
            if stop_early:
                last_block = self.last_block(feature_blocks)
                parts = []  # (maps, features) per call
                # other processors than the capturing ones (the naive reference) are not in a compiled pass
                forward = self._unet_forward if processors is None else partial_unet_forward
                for rows in one_image_per_call(torch.arange(latents.shape[0]), self.compiled, n_prompts):
                    self._state.maps = {}
                    part = forward(self.unet, latents[rows], timesteps[rows], context[rows], last_block,
                                    feature_blocks)
                    parts.append((self._state.maps, part))
                self._state.maps = {name: torch.cat([maps[name] for maps, _ in parts]) for name in parts[0][0]}
                features = {block: torch.cat([part[block] for _, part in parts]) for block in parts[0][1]}
            else:  # diffusers' own forward, whole, as the reference: up-block outputs read by hooks
                features = {}
                handles = [self.unet.up_blocks[block].register_forward_hook(
                    lambda _m, _i, output, block=block: features.__setitem__(block, output))
                    for block in feature_blocks]
                try:
                    self.unet(latents, timesteps, encoder_hidden_states=context)
                finally:
                    for handle in handles:
                        handle.remove()
        finally:
            self._state.active = False
        maps = {name: self._to_grid(probs, n_images, n_prompts) for name, probs in self._state.maps.items()}
        self._state.maps = {}
        return DiffusionOutput(
            cross_attn_maps=maps,
            features={b: f.float().reshape(n_images, n_prompts, *f.shape[1:]) for b, f in sorted(features.items())},
        )

    def _to_grid(self, probs: torch.Tensor, n_images: int, n_prompts: int) -> torch.Tensor:
        """(B·P, Q, T) → (B, P, T, h, w) on the square latent grid of that layer."""
        side = math.isqrt(probs.shape[1])
        grid = tokens_to_grid(probs, (side, side))
        return grid.reshape(n_images, n_prompts, *grid.shape[1:])
