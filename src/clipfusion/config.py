"""Settings as frozen dataclasses, and the named presets built from them.

Presets are data: ``paper-recon`` holds the defaults of the reconstruction
(docs/method.md says which ones the paper states and which we chose), ``tiny`` the very same
classes built from tiny configs with random weights for tests and offline demos.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from clipfusion.errors import ClipfusionError

TINY = "tiny"  # model id meaning "build the tiny random-weight architecture shipped with clipfusion"


@dataclass(frozen=True)
class ClipConfig:
    """The CLIP side (OpenCLIP).

    model_name: an open_clip architecture (``ViT-B-16-plus-240``), ``hf-hub:org/repo``,
    ``local-dir:/path``, or ``tiny``.  pretrained: an open_clip tag (``laion400m_e31``, ``openai``),
    a local weights file, or None for random weights.  image_size: input side in pixels, None for
    the model's native size.
    """

    model_name: str = "ViT-B-16-plus-240"
    pretrained: str | None = "laion400m_e31"
    image_size: int | None = None


@dataclass(frozen=True)
class DiffusionConfig:
    """The Stable Diffusion side (diffusers).

    model_id: a hub id or local directory in the diffusers layout (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/), or ``tiny``.  vae_id: another autoencoder to encode with (e.g.
    ``madebyollin/taesd``, an ``AutoencoderTiny``), None for the model's own.  image_size: the
    side images are resized to before the VAE (latent side = image_size / 8).  timestep: absolute
    DDPM timestep of the forward noise (0-999).  noise_seed: seed of the single noise draw, shared
    by every image so that queries and references are noised alike.
    cross_attn_factors: which cross-attention layers to read, by their downsampling factor relative
    to the latent (1 = latent resolution, 2 = half...); cross_attn_places: ``down``, ``mid``, ``up``.
    feature_blocks: indices of ``unet.up_blocks`` whose outputs are captured as feature maps.
    """

    model_id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    vae_id: str | None = None
    image_size: int = 512
    timestep: int = 100
    noise_seed: int = 0
    cross_attn_factors: tuple[int, ...] = (2, 4)
    cross_attn_places: tuple[str, ...] = ("down", "up")
    feature_blocks: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how models run.  offline: never touch the network (also when HF_HUB_OFFLINE=1)."""

    device: str = "cpu"
    dtype: str = "float32"
    offline: bool = False
    cache_dir: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    clip: ClipConfig = field(default_factory=ClipConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "paper-recon": Preset(
        "paper-recon",
        ClipConfig(),
        DiffusionConfig(),
        "OpenCLIP ViT-B-16-plus-240 (laion400m_e31) + Stable Diffusion v1.5 at 512 px, t = 100: "
        "the reconstruction's defaults (paper-notes §2.6)",
    ),
    "sd21": Preset(
        "sd21",
        ClipConfig(),
        DiffusionConfig(model_id="stabilityai/stable-diffusion-2-1-base"),
        "as paper-recon, with Stable Diffusion 2.1-base",
    ),
    "vitl14": Preset(
        "vitl14",
        ClipConfig(model_name="ViT-L-14-336", pretrained="openai"),
        DiffusionConfig(),
        "as paper-recon, with OpenAI CLIP ViT-L/14 at 336 px",
    ),
    TINY: Preset(
        TINY,
        ClipConfig(model_name=TINY, pretrained=None),
        DiffusionConfig(model_id=TINY, image_size=128),
        "tiny random-weight models of the same classes: offline, fast, meaningless scores (tests, demos)",
    ),
}


def get_preset(name: str, **overrides: Any) -> Preset:
    """A preset by name, with ``clip`` / ``diffusion`` fields overridden by ``clip__<field>=`` style keys.

    Example: ``get_preset("paper-recon", diffusion__timestep=200, clip__image_size=336)``.
    """
    if name not in PRESETS:
        raise ClipfusionError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    grouped: dict[str, dict[str, Any]] = {"clip": {}, "diffusion": {}}
    for key, value in overrides.items():
        group, _, attribute = key.partition("__")
        if group not in grouped or attribute not in {f.name for f in dataclasses.fields(getattr(preset, group))}:
            raise ClipfusionError(f"unknown setting {key!r} for preset {name!r}")
        grouped[group][attribute] = value
    return dataclasses.replace(
        preset,
        clip=dataclasses.replace(preset.clip, **grouped["clip"]),
        diffusion=dataclasses.replace(preset.diffusion, **grouped["diffusion"]),
    )
