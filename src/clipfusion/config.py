"""Settings as frozen dataclasses, and the named presets built from them.

Presets are data: ``paper-recon`` holds the defaults of the reconstruction
(docs/method.md says which ones the paper states and which we chose), ``tiny`` the very same
classes built from tiny configs with random weights for tests and offline demos.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfusion.errors import ClipfusionError, SettingError

TINY = "tiny"  # model id meaning "build the tiny random-weight architecture shipped with clipfusion"
DENSE_MODES = ("vv", "window", "tile", "raw")
ATTENTION_RULES = ("ratio", "anomalous", "difference")
SCORE_RULES = ("mean", "topk", "max", "clip")
MAP_NAMES = ("clip_language", "clip_visual", "diff_language", "diff_visual")
# Names the command line offers; the registries they select from (methods/registry.py, data/__init__.py)
# import torch or image libraries, so the names are kept here.
METHOD_NAMES = ("clipfusion", "winclip", "mean-image")
DATASET_NAMES = ("mvtec", "visa", "folder", "meta")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_CATEGORY = "object"  # the object name in prompts when nothing says what the images show
EXPORT_DTYPES = ("auto", "float32", "bfloat16")  # what OpenVINO Runtime runs an export in on a CPU


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
    noise_draws: how many seeded noise draws (seeds noise_seed, noise_seed + 1, ...) each image is
    encoded with; maps and features are averaged over them (DIFT-style ensembling; costs one UNet pass
    per draw).  vae_dtype: the autoencoder's dtype when it should differ from the runtime dtype, e.g.
    ``float32`` under a ``float16`` UNet (SD's VAE is known to overflow in float16); None = the runtime's.
    naive: compute the same maps the slow, straightforward way — per prompt its own VAE encode and a
    full UNet pass with attention probabilities built in every layer — as the reference that tests
    and benchmarks compare the fast path with.  Never faster; never needed otherwise.
    """

    model_id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    vae_id: str | None = None
    image_size: int = 512
    timestep: int = 100
    noise_seed: int = 0
    cross_attn_factors: tuple[int, ...] = (2, 4)
    cross_attn_places: tuple[str, ...] = ("down", "up")
    feature_blocks: tuple[int, ...] = (1, 2)
    noise_draws: int = 1
    vae_dtype: str | None = None
    naive: bool = False


@dataclass(frozen=True)
class PatchClipConfig:
    """PatchCLIP: CLIP's language map (patches vs state prompts) and visual map (patches vs memory).

    dense_mode: how patches get text-aligned embeddings: ``vv`` (value–value attention in the last
    block), ``window`` (WinCLIP masked windows at ``window_scales``, harmonic aggregation),
    ``tile`` (class token of ``tile_grid``² crops), ``raw`` (final patch tokens; ablation only).
    temperature: softmax temperature of the normal/anomalous similarity.  visual_blocks: blocks
    whose patch tokens feed the visual map (averaged).  broken_prompt: add "broken {}" to the
    anomalous states.
    """

    dense_mode: str = "vv"
    temperature: float = 0.07
    visual_blocks: tuple[int, ...] = (-1,)
    window_scales: tuple[int, ...] = (2, 3)
    tile_grid: int = 3
    broken_prompt: bool = False


@dataclass(frozen=True)
class MapDiffConfig:
    """MapDiff: diffusion language map (cross-attention on state words) and visual map (UNet features).

    The UNet sees one prompt per state word, ``template`` filled with the word and the class name;
    maps of several words of a state are averaged.  attention_rule turns the attention on
    anomalous (A_a) and normal (A_n) words into an anomaly map in [0, 1]: ``ratio`` A_a/(A_a+A_n),
    ``anomalous`` A_a alone, ``difference`` (A_a − A_n + 1)/2.  joint_prompt: one prompt carrying every
    state word ("a photo of a flawless or damaged bottle"), so the words compete in one attention
    softmax and the UNet runs one row per image instead of one per word (the fast preset's choice).
    """

    template: str = "a photo of a {state} {name}"
    normal_words: tuple[str, ...] = ("flawless",)
    anomalous_words: tuple[str, ...] = ("damaged",)
    attention_rule: str = "ratio"
    joint_prompt: bool = False


@dataclass(frozen=True)
class PromptConfig:
    """How a category name becomes the object name in every prompt (CLIP ensembles, UNet prompts).

    class_names: (category, name) pairs that override the default rule (underscores become spaces);
    from the command line a JSON object, ``--set prompts__class_names='{"pcb1": "circuit board"}'``.
    """

    class_names: tuple[tuple[str, str], ...] = (
        ("pcb1", "printed circuit board"), ("pcb2", "printed circuit board"),
        ("pcb3", "printed circuit board"), ("pcb4", "printed circuit board"),
        ("macaroni1", "macaroni"), ("macaroni2", "macaroni"), ("chewinggum", "chewing gum"),
    )

    def name_of(self, category: str) -> str:
        return dict(self.class_names).get(category) or category.replace("_", " ").strip() or "object"


@dataclass(frozen=True)
class MemoryConfig:
    """Few-shot visual maps: a query position's distance to the memory bank of its layer.

    neighbours: the distance is the mean of ½(1 − cos) over this many nearest reference features
    (1 = the nearest one, the default; more smooths out a single lucky match).
    """

    neighbours: int = 1


@dataclass(frozen=True)
class FusionConfig:
    """Fusion and read-out.

    M = α (M_clip_L + M_clip_V) + (1 − α)(M_diff_L + M_diff_V), with α = alpha_seg for the pixel map
    and alpha_cls for the map the image score reads; visual terms only when fitted.  maps: which of
    ``clip_language``, ``clip_visual``, ``diff_language``, ``diff_visual`` take part (ablations).
    sigma: Gaussian smoothing in pixels at a 256-pixel output (scaled with output_size; 0 = off).
    score_rule: ``mean`` ½(s_clip + max M_cls), ``topk`` ½(s_clip + mean of the top ``topk_fraction``
    of M_cls), ``max`` max M_cls, ``clip`` s_clip alone.
    """

    alpha_seg: float = 0.5
    alpha_cls: float = 0.5
    sigma: float = 4.0
    output_size: int = 256
    score_rule: str = "mean"
    topk_fraction: float = 0.01
    maps: tuple[str, ...] = ("clip_language", "clip_visual", "diff_language", "diff_visual")


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/clipfusion/<name>`` (``~/.cache/clipfusion/<name>``), beside the Hugging Face cache's
    default: where clipfusion keeps what it can make again (demo data, tokenizer files, compiled parts, text
    embeddings)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipfusion" / name


PRECOMPILED_MODES = ("off", "auto", "build")  # RuntimeConfig.precompiled
PRECOMPILED_CACHE_ENV = "CLIPFUSION_COMPILED_CACHE"  # where the precompiled packages live (encoders.precompiled)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how models run.  device: ``auto`` (cuda, then mps, then cpu), cpu, cuda, cuda:N or
    mps.  dtype: ``auto`` (the precision a model file records where this machine runs it natively;
    otherwise float16 on CUDA, bfloat16 on CPUs with native bf16, float32 elsewhere: the command line's
    default too, ``hardware.model_precision``), float32, float16 or bfloat16.  offline: never touch the
    network (also when HF_HUB_OFFLINE=1).  compile: run the UNet pass and the autoencoder through
    ``torch.compile`` (inductor, weights frozen in), one image per call: the same maps, a slow first
    image (minutes on a CPU), faster after that (docs/speed.md).  precompiled: the same compiled code built
    once per model and machine into a cache and loaded in seconds (``clipfusion.encoders.precompiled``):
    ``off``, ``auto`` (use a package that is there, else run eager) or ``build`` (compile a missing one
    first)."""

    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    cache_dir: str | None = None
    hub_timeout: float = 10.0  # seconds the model hub gets to answer before the local cache is used alone
    compile: bool = False
    precompiled: str = "off"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise SettingError(f"device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        _choice("dtype", self.dtype, ("auto", *DTYPES))
        if self.compile and self.device == "mps":
            raise SettingError("compile runs on cpu or cuda, not mps: drop --compile")
        _choice("precompiled", self.precompiled, PRECOMPILED_MODES)
        if self.precompiled != "off" and self.device == "mps":
            raise SettingError("precompiled parts run on cpu or cuda, not mps: drop --precompiled")
        if self.compile and self.precompiled != "off":
            raise SettingError("--compile compiles in this process, --precompiled loads what was compiled before: "
                               "give one of them")

    def resolved(self, recorded: str | None = None) -> tuple[RuntimeConfig, str | None]:
        """This runtime with ``auto`` made concrete for a model whose bank and thresholds were computed
        in ``recorded`` (None: no model file), and why that precision does not run (None when it does)."""
        from clipfusion.hardware import model_precision

        device, dtype, reason = model_precision(self.device, self.dtype, recorded)
        return dataclasses.replace(self, device=device, dtype=dtype), reason


@dataclass(frozen=True)
class Preset:
    name: str
    clip: ClipConfig = field(default_factory=ClipConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    description: str = ""
    patchclip: PatchClipConfig = field(default_factory=PatchClipConfig)
    mapdiff: MapDiffConfig = field(default_factory=MapDiffConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)


SETTING_GROUPS = ("clip", "diffusion", "patchclip", "mapdiff", "fusion", "prompts", "memory")


PRESETS: dict[str, Preset] = {
    "paper-recon": Preset(
        "paper-recon",
        ClipConfig(),
        DiffusionConfig(),
        "the reconstruction's defaults (docs/method.md)",
    ),
    "sd21": Preset(
        "sd21",
        ClipConfig(),
        DiffusionConfig(model_id="stabilityai/stable-diffusion-2-1-base"),
        "paper-recon with Stable Diffusion 2.1-base",
    ),
    "vitl14": Preset(
        "vitl14",
        ClipConfig(model_name="ViT-L-14-336", pretrained="openai"),
        DiffusionConfig(),
        "paper-recon with OpenAI CLIP ViT-L/14 at 336 px",
    ),
    "fast": Preset(
        "fast",
        ClipConfig(),
        DiffusionConfig(image_size=256, vae_id="madebyollin/taesd"),
        "paper-recon's method at 256 px (latent 32²) with the tiny autoencoder and one joint state prompt: "
        "several times faster (docs/speed.md), accuracy unmeasured; check it on your data with `clipfusion sweep`",
        mapdiff=MapDiffConfig(joint_prompt=True),
    ),
    TINY: Preset(
        TINY,
        ClipConfig(model_name=TINY, pretrained=None),
        DiffusionConfig(model_id=TINY, image_size=128),
        "tiny random-weight models of the same classes: offline, fast, meaningless scores (tests, demos)",
    ),
}


PRESET_NAMES = tuple(PRESETS)


def presets_markdown() -> str:
    """The presets as a Markdown table (name, CLIP, Stable Diffusion, what it is), for the README:
    generated from :data:`PRESETS`, so the documentation cannot drift from the code."""
    lines = ["| preset | CLIP | Stable Diffusion | what it is |", "|---|---|---|---|"]
    for name, preset in PRESETS.items():
        clip = f"`{preset.clip.model_name}` / `{preset.clip.pretrained}`" if preset.clip.pretrained else \
            "tiny random-weight CLIP"
        diffusion = preset.diffusion
        sd = "tiny random-weight UNet, VAE and text encoder" if diffusion.model_id == TINY else \
            f"`{diffusion.model_id}` at {diffusion.image_size} px, t = {diffusion.timestep}" + \
            (f", VAE `{diffusion.vae_id}`" if diffusion.vae_id else "")
        default = " (default)" if name == "paper-recon" else ""
        lines.append(f"| `{name}`{default} | {clip} | {sd} | {preset.description} |")
    return "\n".join(lines) + "\n"
# the mean-image baseline is not worth timing; clipfusion-openvino(-int8): CLIPFusion exported, on OpenVINO
BENCHMARK_METHODS = (*METHOD_NAMES[:2], "clipfusion-compiled", "clipfusion-openvino", "clipfusion-openvino-int8")


def get_preset(name: str, **overrides: Any) -> Preset:
    """A preset by name, with fields overridden by ``<group>__<field>=value`` keys.

    Groups: clip, diffusion, patchclip, mapdiff, fusion, prompts, memory.  Example:
    ``get_preset("paper-recon", diffusion__timestep=200, fusion__alpha_seg=0.3)``.
    """
    if name not in PRESETS:
        raise ClipfusionError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return override(PRESETS[name], **overrides)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``GROUP__FIELD=VALUE`` texts (``--set``) → overrides; a VALUE that is JSON is read as JSON (lists,
    numbers, booleans), anything else is kept as text.  Checked against a preset by :func:`override`."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ClipfusionError(f"--set needs GROUP__FIELD=VALUE, not {item!r}")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    return overrides


def override(preset: Preset, **overrides: Any) -> Preset:
    """``preset`` with ``<group>__<field>=value`` overrides applied (see :func:`get_preset`)."""
    grouped: dict[str, dict[str, Any]] = {group: {} for group in SETTING_GROUPS}
    for key, value in overrides.items():
        group, _, attribute = key.partition("__")
        section = getattr(preset, group) if group in grouped else None
        defaults = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)} if section else {}
        if attribute not in defaults:
            raise ClipfusionError(f"unknown setting {key!r}; use <group>__<field> with a group of {SETTING_GROUPS}")
        grouped[group][attribute] = _as_field_value(key, value, defaults[attribute])
    updated = dataclasses.replace(
        preset, **{group: dataclasses.replace(getattr(preset, group), **fields) for group, fields in grouped.items()}
    )
    check(updated)
    return updated


def _as_field_value(key: str, value: Any, default: Any) -> Any:
    """A JSON-ish value in the shape of a field: lists become tuples, an object becomes sorted
    (key, value) pairs, one string for a tuple of strings is a one-element tuple (never its letters),
    and a value of the wrong kind for a number or a switch is a SettingError naming the setting."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), str(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(default, tuple) and isinstance(value, str):
        return (value,)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SettingError(f"{key} must be true or false, not {value!r}")
    elif isinstance(default, int | float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise SettingError(f"{key} must be a number, not {value!r}")
    elif isinstance(default, int) and isinstance(value, float):
        if not value.is_integer():
            raise SettingError(f"{key} must be a whole number, not {value!r}")
        return int(value)
    elif isinstance(default, float):
        return float(value)
    return value


def _at_least(name: str, value: float, low: float, strict: bool = False) -> None:
    if not (value > low if strict else value >= low) or value != value:  # value != value: NaN
        raise SettingError(f"{name} must be {'>' if strict else '>='} {low:g}, not {value!r}")


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise SettingError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def check(preset: Preset) -> None:
    """Refuse impossible settings before any model loads (SettingError naming the setting)."""
    _choice("patchclip__dense_mode", preset.patchclip.dense_mode, DENSE_MODES)
    _choice("mapdiff__attention_rule", preset.mapdiff.attention_rule, ATTENTION_RULES)
    _choice("fusion__score_rule", preset.fusion.score_rule, SCORE_RULES)
    for name in preset.fusion.maps:
        _choice("each of fusion__maps", name, MAP_NAMES)
    if not preset.fusion.maps:
        raise SettingError("fusion__maps must name at least one map")
    if not preset.mapdiff.normal_words or not preset.mapdiff.anomalous_words:
        raise SettingError("mapdiff needs at least one normal and one anomalous word")
    for name in ("alpha_seg", "alpha_cls"):
        if not 0.0 <= getattr(preset.fusion, name) <= 1.0:
            raise SettingError(f"fusion__{name} must lie in [0, 1], not {getattr(preset.fusion, name)}")
    if preset.diffusion.noise_draws < 1:
        raise SettingError(f"diffusion__noise_draws must be >= 1, not {preset.diffusion.noise_draws}")
    if preset.diffusion.vae_dtype is not None:
        _choice("diffusion__vae_dtype", preset.diffusion.vae_dtype, DTYPES)
    if preset.memory.neighbours < 1:
        raise SettingError(f"memory__neighbours must be >= 1, not {preset.memory.neighbours}")
    if not 0 <= preset.diffusion.timestep < 1000:
        raise SettingError(f"diffusion__timestep must lie in 0-999, not {preset.diffusion.timestep}")
    _at_least("patchclip__temperature", preset.patchclip.temperature, 0.0, strict=True)
    _at_least("patchclip__tile_grid", preset.patchclip.tile_grid, 1)
    for scale in preset.patchclip.window_scales:
        _at_least("each of patchclip__window_scales", scale, 1)
    _at_least("fusion__sigma", preset.fusion.sigma, 0.0)
    _at_least("fusion__output_size", preset.fusion.output_size, 1)
    if not 0.0 < preset.fusion.topk_fraction <= 1.0:
        raise SettingError(f"fusion__topk_fraction must lie in (0, 1], not {preset.fusion.topk_fraction}")
    if preset.diffusion.image_size < 8 or preset.diffusion.image_size % 8:
        raise SettingError(f"diffusion__image_size must be a positive multiple of 8 (the autoencoder's factor), "
                           f"not {preset.diffusion.image_size}")
    if preset.clip.image_size is not None:
        _at_least("clip__image_size", preset.clip.image_size, 1)
    _at_least("diffusion__noise_seed", preset.diffusion.noise_seed, 0)
    try:
        filled = preset.mapdiff.template.format(state="\0state", name="\0name")
    except (KeyError, IndexError, ValueError) as exc:
        raise SettingError(f"mapdiff__template may hold only {{state}} and {{name}}, not {preset.mapdiff.template!r} "
                           f"({type(exc).__name__}: {exc})") from None
    if "\0state" not in filled or "\0name" not in filled:
        raise SettingError(f"mapdiff__template must hold {{state}} and {{name}}, not {preset.mapdiff.template!r}")
