"""Finding and building the models: hub ids, local paths, offline mode, tiny random models.

Real weights come from the Hugging Face hub cache (``~/.cache/huggingface/hub`` or ``cache_dir``)
or from local paths.  In offline mode (``offline=True`` or ``HF_HUB_OFFLINE=1``) nothing touches
the network, and missing weights raise :class:`WeightsNotFoundError` naming the model, the cache
looked in, and the two fixes.  ``tiny`` builds the same classes from the small configs in
``clipfusion/model_configs`` with random weights under a fixed seed.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import pickle
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipfusion.config import TINY, ClipConfig, DiffusionConfig, RuntimeConfig, user_cache_dir
from clipfusion.encoders.prepacking import prepack_convolutions
from clipfusion.errors import ClipfusionError, WeightsNotFoundError
from clipfusion.hardware import cpu_info, slow_on_cpu
from clipfusion.notices import say_once
from clipfusion.outputs import write_atomic

if TYPE_CHECKING:  # diffusers and transformers load only when a model is built
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel

TINY_SEED = 0
logger = logging.getLogger(__name__)
TINY_CLIP_NAME = "clipfusion-tiny-clip"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_config(name: str) -> dict[str, Any]:
    """A model config shipped with clipfusion (``model_configs/<name>.json``)."""
    return json.loads(resources.files("clipfusion").joinpath(f"model_configs/{name}.json").read_text())


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ClipfusionError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def runtime_device_dtype(runtime: RuntimeConfig) -> tuple[torch.device, torch.dtype]:
    """The runtime's device and dtype, warning when a half precision is asked of a CPU where it is slow:
    float16 on any CPU, bfloat16 on a CPU without native bf16 (no AVX-512 BF16 or AMX)."""
    runtime = runtime.resolved()[0]  # ``auto`` as the command line means it (a model file resolves it before)
    device, dtype = torch_device(runtime.device), torch_dtype(runtime.dtype)
    say_once(logger, logging.INFO, f"running on {runtime.device} in {runtime.dtype}")
    if device.type == "cpu" and slow_on_cpu(runtime.dtype, cpu_info()):
        say_once(logger, logging.WARNING, f"{runtime.dtype} on this CPU ({cpu_info().model}) is emulated: 7-60x "
                                          "slower than float32 on the CPUs we measured; use --dtype float32 here")
    return device, dtype


def torch_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked for availability with a clear error."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipfusionError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ClipfusionError("device 'mps' requested but this torch build has no MPS support; use --device cpu")
    return device


def is_offline(runtime: RuntimeConfig) -> bool:
    """Offline when asked (--offline, HF_HUB_OFFLINE=1) or when the hub does not answer in time."""
    if runtime.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    return not hub_answers(runtime.hub_timeout)


@cache
def hub_answers(timeout: float) -> bool:
    """Whether the model hub (HF_ENDPOINT) answers an HTTP request within ``timeout`` seconds.

    Asked once per process, before any download: huggingface_hub retries a silent server with
    back-off for minutes (405 s measured), while this probe bounds the wait; on no answer the
    weights come from the local cache only, and a missing file is the one-line weights error.
    """
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered, if only with an error status
    except (OSError, ValueError) as exc:
        logger.warning("the model hub %s did not answer within %g s (%s): using the local cache only",
                       constants.ENDPOINT, timeout, getattr(exc, "reason", exc))
        return False
    return True


def hub_cache_dir(runtime: RuntimeConfig) -> str:
    from huggingface_hub import constants

    return runtime.cache_dir or constants.HF_HUB_CACHE


def missing_weights(
    model_id: str, runtime: RuntimeConfig, local_hint: str, cause: BaseException
) -> WeightsNotFoundError:
    where = "offline mode" if is_offline(runtime) else f"download failed: {type(cause).__name__}"
    return WeightsNotFoundError(
        f"weights for {model_id} not found in the cache {hub_cache_dir(runtime)} ({where}). Fix: run once with "
        f"network access (without --offline / HF_HUB_OFFLINE=1) to download them into that cache, or pass a "
        f"local path: {local_hint}"
    )


def _hub_file(repo_id: str, filenames: list[str], runtime: RuntimeConfig, local_hint: str, display: str) -> str:
    """The first of ``filenames`` that the hub (or, offline, its cache) has for ``repo_id``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    error: BaseException | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=runtime.cache_dir, local_files_only=is_offline(runtime))
        except LocalEntryNotFoundError as exc:  # not cached and the hub unreachable: other names fail alike
            raise missing_weights(display, runtime, local_hint, exc) from exc
        except EntryNotFoundError as exc:  # the hub answered that the repo has no such file: next name
            error = exc
        # broad on purpose: the hub raises many types (no access, bad id, network, cache), and each one
        # means the same to the user, missing weights, reported with the hub's own text
        except Exception as exc:
            raise missing_weights(display, runtime, local_hint, exc) from exc
    raise missing_weights(display, runtime, local_hint, error or FileNotFoundError(repo_id))


@cache
def _register_tiny_clip() -> None:
    import open_clip

    open_clip.add_model_config(resources.files("clipfusion").joinpath(f"model_configs/{TINY_CLIP_NAME}.json"))


@dataclass
class OpenClipParts:
    model: Any  # open_clip.CLIP; open_clip is untyped, its submodules are read by name
    tokenizer: Any
    model_id: str  # what the weights are, for caches and manifests
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _building(skip_init: bool) -> Iterator[None]:
    """One model build at a time; ``skip_init``: without drawing random initial weights.

    open_clip draws every weight at random before it reads the checkpoint over them (strictly: every
    parameter and buffer it keeps is in the file): 3 s of a cold start for ``fast``'s CLIP.  transformers'
    ``no_init_weights`` (what its own ``from_pretrained`` uses) turns torch's initialisers into no-ops, for
    the whole process while it lasts; the lock keeps another clipfusion build (a random tiny model in
    another thread) from running inside it.
    """
    with _BUILD_LOCK:
        if not skip_init:
            yield
            return
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x kept it here
            from transformers.modeling_utils import no_init_weights
        with no_init_weights():
            yield


def load_open_clip(
    config: ClipConfig, runtime: RuntimeConfig, device: str | torch.device | None = None
) -> OpenClipParts:
    """Build the open_clip model of ``config``; ``device="meta"`` builds the architecture without memory."""
    import open_clip

    runtime = runtime.resolved()[0]
    target = device if device is not None else runtime_device_dtype(runtime)[0]
    hint = ("--set clip__pretrained=/path/to/open_clip_model.safetensors (Python: "
            "ClipConfig(pretrained=...)), or clip__model_name=local-dir:/path/to/folder")
    name, pretrained, quick_gelu = config.model_name, config.pretrained, False
    if name == TINY:
        _register_tiny_clip()
        name, pretrained = TINY_CLIP_NAME, None
    elif name.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        repo = name.removeprefix("hf-hub:")
        try:
            name = "local-dir:" + snapshot_download(repo, cache_dir=runtime.cache_dir,
                                                    local_files_only=is_offline(runtime))
        except Exception as exc:  # broad on purpose, as above: any failure to fetch is reported with its text
            raise missing_weights(repo, runtime, hint, exc) from exc
        pretrained = None
    elif pretrained is not None and not Path(pretrained).expanduser().is_file():
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ClipfusionError(f"open_clip has no pretrained tag {pretrained!r} for {name}; known tags: {tags}")
        repo, filename = os.path.split(tag_cfg["hf_hub"])  # "org/repo/" or "org/repo/file"
        files = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))  # OpenAI weights need QuickGELU
        display = f"{name} / {pretrained} (hub repo {repo})"
        pretrained = _hub_file(repo, files, runtime, hint, display) if str(target) != "meta" else None
    elif pretrained is not None:
        pretrained = str(Path(pretrained).expanduser())

    previous_disable = logging.root.manager.disable
    if pretrained is None:  # random weights on purpose: silence open_clip's "no pretrained weights" warning
        logging.disable(logging.WARNING)
    try:
        # a local-dir: folder without weights is built at random (open_clip only warns): initialised then
        with torch.random.fork_rng(devices=[]), _building(skip_init=pretrained is not None):
            torch.manual_seed(TINY_SEED)  # random (tiny) weights are the same on every run
            model = open_clip.create_model(
                name, pretrained=pretrained, device=target, force_quick_gelu=quick_gelu,
                force_image_size=config.image_size, cache_dir=runtime.cache_dir,
            )
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        if pretrained is None:
            raise
        # a pickle that torch.load refuses (weights_only), a truncated file, weights of another architecture
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipfusionError(f"cannot load CLIP weights {pretrained} into {name}: {first_line[:300]}; give "
                              "open_clip weights of that architecture, preferably .safetensors") from None
    finally:
        logging.disable(previous_disable)
    model.eval()
    if str(target) != "meta":
        model.to(dtype=torch_dtype(runtime.dtype))
    preprocess = getattr(model.visual, "preprocess_cfg", {})
    return OpenClipParts(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        model_id=f"{config.model_name}/{config.pretrained}",
        mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
    )


@cache
def tiny_tokenizer_dir() -> str:
    """A CLIPTokenizer folder (vocab.json, merges.txt) made from the BPE merges open_clip ships.

    The result gives OpenAI CLIP's token ids, the ones Stable Diffusion's tokenizer uses, offline.
    """
    import open_clip.tokenizer as oc_tokenizer

    folder = user_cache_dir("clip-tokenizer")
    if all((folder / name).is_file() for name in ("vocab.json", "merges.txt", "tokenizer_config.json")):
        return str(folder)
    with gzip.open(oc_tokenizer.default_bpe()) as handle:
        merges = handle.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(oc_tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "model_max_length": 77}
    # atomically, the config last: two processes making it at once never leave (or read) a half-written file
    write_atomic(folder / "vocab.json", json.dumps({token: i for i, token in enumerate(vocab)}))
    write_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_atomic(folder / "tokenizer_config.json", json.dumps(special))
    return str(folder)


@dataclass
class DiffusionParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL | AutoencoderTiny
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler: Any
    model_id: str


def build_diffusion_from_configs(
    unet: str, vae: str, text_encoder: str, device: str | torch.device = "cpu", seed: int = TINY_SEED
) -> DiffusionParts:
    """Models from shipped configs with random weights (tiny for tests; full size for benchmarks/meta)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        parts = DiffusionParts(
            unet=UNet2DConditionModel(**model_config(unet)),
            vae=AutoencoderTiny() if vae == "taesd" else AutoencoderKL(**model_config(vae)),  # TAESD = defaults
            text_encoder=CLIPTextModel(CLIPTextConfig(**model_config(text_encoder))),
            tokenizer=CLIPTokenizer.from_pretrained(tiny_tokenizer_dir()),
            scheduler=DDPMScheduler.from_config(model_config("sd-scheduler")),
            model_id=f"configs:{unet}+{vae}+{text_encoder}",
        )
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.eval()
    return parts


# "random:<name>" model ids: full-size architectures with random weights, for speed benchmarks only.
RANDOM_ARCHITECTURES = {
    "sd15": ("sd15-unet", "sd-vae", "sd15-text-encoder"),
    "sd21-base": ("sd21-base-unet", "sd-vae", "sd21-base-text-encoder"),
    TINY: ("tiny-unet", "tiny-vae", "tiny-text-encoder"),
}
RANDOM_PREFIX = "random:"


def _random_architecture(config: DiffusionConfig) -> DiffusionParts | None:
    name = TINY if config.model_id == TINY else config.model_id.removeprefix(RANDOM_PREFIX)
    if name == config.model_id and config.model_id != TINY:
        return None
    if name not in RANDOM_ARCHITECTURES:
        raise ClipfusionError(f"unknown architecture {config.model_id!r}; random ones: "
                              f"{', '.join(RANDOM_PREFIX + n for n in RANDOM_ARCHITECTURES)}")
    unet, vae, text = RANDOM_ARCHITECTURES[name]
    if config.vae_id is not None:
        if config.vae_id != RANDOM_PREFIX + "taesd":
            raise ClipfusionError(f"a random architecture needs a random autoencoder, not {config.vae_id!r}")
        vae = "taesd"
    return build_diffusion_from_configs(unet, vae, text)


def load_diffusion(config: DiffusionConfig, runtime: RuntimeConfig) -> DiffusionParts:
    """UNet, autoencoder, text encoder, tokenizer and DDPM scheduler of ``config.model_id``.

    ``tiny`` and ``random:<architecture>`` (benchmarks) build random weights from shipped configs.
    """
    from diffusers import AutoModel, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTokenizer

    runtime = runtime.resolved()[0]
    device, dtype = runtime_device_dtype(runtime)
    vae_dtype = torch_dtype(config.vae_dtype) if config.vae_dtype else dtype
    parts = _random_architecture(config)
    if parts is not None:
        # diffusers warns at every .to(dtype) of a model that lists no float32-only modules (an empty list
        # is not None): void for these architectures, and said at every command in bfloat16
        casting = logging.getLogger("diffusers.models.modeling_utils")
        level = casting.level
        casting.setLevel(logging.ERROR)
        try:
            for module, wanted in ((parts.unet, dtype), (parts.text_encoder, dtype), (parts.vae, vae_dtype)):
                if next(module.parameters()).dtype != wanted:
                    module.to(dtype=wanted)
        finally:
            casting.setLevel(level)
    else:
        source = config.model_id
        # local folders need no hub: asking it would make an air-gapped line PC wait for its answer (10 s by
        # default) at every start
        local = all(Path(name).expanduser().is_dir() for name in (source, config.vae_id) if name is not None)
        common = {"cache_dir": runtime.cache_dir, "local_files_only": local or is_offline(runtime)}
        # positional: AutoModel.from_pretrained names its first parameter pretrained_model_or_path (diffusers
        # 0.42), so a pretrained_model_name_or_path keyword was taken as an unknown option and the VAE looked for
        # in None (found by tests/test_doctor.py's local diffusers folder)
        vae_source, vae_subfolder = (config.vae_id, None) if config.vae_id else (source, "vae")
        # Without accelerate diffusers asks for it at every model it loads (a warning at every start) and loads
        # as it does with this set; installing it changed neither a start's time nor its peak here
        # (docs/speed.md), so it is used where present, never asked for.
        low_memory = {"low_cpu_mem_usage": is_accelerate_available()}
        try:
            parts = DiffusionParts(
                unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **common,
                                                          **low_memory),
                vae=AutoModel.from_pretrained(vae_source, subfolder=vae_subfolder, torch_dtype=vae_dtype, **common,
                                              **low_memory),
                text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **common),
                tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
                scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
                model_id=source if not config.vae_id else f"{source}+{config.vae_id}",
            )
        except (OSError, ValueError) as exc:
            hint = "--set diffusion__model_id=/path/to/a/diffusers/folder (Python: DiffusionConfig(model_id=...))"
            raise missing_weights(source, runtime, hint, exc) from exc
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device=device).eval()
    # oneDNN's convolutions prefer channels-last.  Measured on a 2-core AVX2 EPYC (benchmarks/compile.py):
    # the VAE encoders 1.18x (SD at 512 px) and 1.19x (TAESD at 256 px) faster; the UNet 8 % faster on one
    # such machine, unchanged on another.  Same maps to float rounding.
    for module in (parts.unet, parts.vae):
        module.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        # The UNet's convolution weights packed for oneDNN once instead of at every call: its pass at a 32²
        # latent (fast) 1.65x faster, the same maps to float rounding.  The VAE encoders gain nothing
        # (0.97x, 0.99x); measured interleaved by benchmarks/compile.py on a 2-core AVX2 EPYC.
        prepack_convolutions(parts.unet)
    return parts


def weights_cached(clip: ClipConfig, diffusion: DiffusionConfig, cache_dir: str | None = None) -> bool:
    """Whether both models' weights are already on this machine (hub cache or local paths); no network."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    def cached(repo: str, filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache_dir), str)

    if clip.pretrained and Path(clip.pretrained).expanduser().is_file():
        clip_ok = True
    else:
        tag_cfg = open_clip.get_pretrained_cfg(clip.model_name, clip.pretrained or "") or {}
        repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
        files = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        clip_ok = bool(repo) and any(cached(repo, f) for f in files)
    sd_ok = Path(diffusion.model_id).expanduser().is_dir() or cached(diffusion.model_id, "unet/config.json")
    return clip_ok and sd_ok
