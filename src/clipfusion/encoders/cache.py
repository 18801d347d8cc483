"""Encoders shared within a process: weights load once, text caches persist across detectors.

The evaluation runner makes a fresh detector for every (category, shots, seed) unit; without this,
each unit would reload Stable Diffusion and re-encode the CLIP prompt ensembles.
"""
from __future__ import annotations

import dataclasses
import gc
from functools import lru_cache

import torch

from clipfusion.config import ClipConfig, DiffusionConfig, RuntimeConfig
from clipfusion.encoders.clip import ClipEncoder
from clipfusion.encoders.diffusion import DiffusionEncoder
from clipfusion.encoders.loading import DiffusionParts, load_diffusion


def clip_encoder(config: ClipConfig, runtime: RuntimeConfig) -> ClipEncoder:
    # keyed by the concrete runtime: ``auto`` and what it means share one set of weights
    return _clip_encoder(config, dataclasses.replace(runtime.resolved()[0], compile=False,  # CLIP runs eager
                                                     precompiled="off"))


# Weights are loaded outside torch.inference_mode even where a detector loads them lazily inside it (predict):
# tensors made inside it have no version counter, so the digest of their weights (the text cache's key, the
# self-check, the precompiled parts' keys) could not be kept and was hashed again at every call (0.55 s a time
# for fast's CLIP; seconds for its UNet).
@lru_cache(maxsize=2)
def _clip_encoder(config: ClipConfig, runtime: RuntimeConfig) -> ClipEncoder:
    with torch.inference_mode(False):
        return ClipEncoder.from_config(config, runtime)


@lru_cache(maxsize=2)
def _diffusion_parts(model_id: str, vae_id: str | None, vae_dtype: str | None, runtime: RuntimeConfig
                     ) -> DiffusionParts:
    with torch.inference_mode(False):
        return load_diffusion(DiffusionConfig(model_id=model_id, vae_id=vae_id, vae_dtype=vae_dtype), runtime)


def diffusion_encoder(config: DiffusionConfig, runtime: RuntimeConfig) -> DiffusionEncoder:
    """Encoders differing only in read-out settings (layers, timestep...) share one set of weights."""
    return _diffusion_encoder(config, runtime.resolved()[0])


@lru_cache(maxsize=4)
def _diffusion_encoder(config: DiffusionConfig, runtime: RuntimeConfig) -> DiffusionEncoder:
    # compiled and eager encoders of a model share its weights
    weights = dataclasses.replace(runtime, compile=False, precompiled="off")
    parts = _diffusion_parts(config.model_id, config.vae_id, config.vae_dtype, weights)
    return DiffusionEncoder(dataclasses.replace(parts), config, runtime.compile, runtime.precompiled)


def release() -> None:
    """Forget every shared encoder and its weights (a benchmark's next preset), so that the memory can go
    once nothing else holds them."""
    for cached in (_clip_encoder, _diffusion_parts, _diffusion_encoder):
        cached.cache_clear()
    gc.collect()
