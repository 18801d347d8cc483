"""Model parts compiled ahead of time (torch's AOTInductor), built once per model and machine and
loaded in seconds: ``RuntimeConfig.precompiled`` (``--precompiled``, ``clipfusion compile``).

``--compile`` compiles the UNet pass and the autoencoder in the process that runs them: a minute or
more before the first image, at every start.  Here the same frozen-weight inductor code is compiled
once into a package (``torch._inductor.aoti_compile_and_package``: the generated kernels as a shared
library and the weights as constants) in a cache folder, and every later process loads it.

A package holds what it was compiled for, and its folder's name is a digest of all of it (the
:func:`package_fields`): the part and its input shapes, the read-out (last block, feature blocks,
capturing layers), the digest of the weights, the dtype, the device, torch's version and the CPU's
instruction set, and the source of the code it traced.  A change in any of them looks for another
folder, so a stale package is never used: it is simply not found.  ``key.json`` beside each package
says what it is for.

Modes: ``off`` (eager), ``auto`` (a package in the cache is used, a missing one is said once and the
part runs eager) and ``build`` (a missing package is compiled first, minutes).  The UNet package
captures every token column of the cross-attention; the columns a category needs are picked after
the call (the mean over heads is per column, so this equals capturing them inside).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from filelock import FileLock

from clipfusion.config import PRECOMPILED_CACHE_ENV, user_cache_dir
from clipfusion.encoders.attention import CaptureState
from clipfusion.encoders.compiling import route_compiler_logs
from clipfusion.encoders.digest import weights_digest

logger = logging.getLogger("clipfusion")

PACKAGE = "package.pt2"
# the files whose code a package traces: a changed line of any makes every package stale
TRACED_SOURCES = ("diffusion.py", "attention.py", "precompiled.py")
UnetPass = Callable[..., dict[int, torch.Tensor]]  # partial_unet_forward's signature
VaePass = Callable[[Any, torch.Tensor], torch.Tensor]  # vae_latents'


class Encoder(Protocol):
    """What the packages need of a ``DiffusionEncoder``: its models, precision, capture state and layers."""

    unet: torch.nn.Module
    vae: Any
    dtype: torch.dtype
    device: torch.device
    layer_names: list[str]
    _state: CaptureState
KEY = "key.json"


def cache_root() -> Path:
    """Where packages live: ``$CLIPFUSION_COMPILED_CACHE``, else ``$XDG_CACHE_HOME/clipfusion/compiled``
    (``~/.cache/clipfusion/compiled``), beside the Hugging Face cache's default."""
    if os.environ.get(PRECOMPILED_CACHE_ENV):
        return Path(os.environ[PRECOMPILED_CACHE_ENV])
    return user_cache_dir("compiled")


@functools.cache
def _source_digest() -> str:
    """SHA-256 of the code a package traces (:data:`TRACED_SOURCES`)."""
    digest = hashlib.sha256()
    for name in TRACED_SOURCES:
        digest.update(Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()


def environment_fields(device: torch.device) -> dict[str, Any]:
    """What the generated code depends on besides the model: torch, the device and the CPU's instruction set."""
    from clipfusion.hardware import cpu_info

    cpu = cpu_info()
    return {"torch": torch.__version__, "device": device.type,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu.model,
            "cpu_flags": list(cpu.flags), "source": _source_digest()}


def package_fields(part: str, weights: str, dtype: torch.dtype, device: torch.device,
                   inputs: Sequence[torch.Tensor], **settings: Any) -> dict[str, Any]:
    """Everything a package is compiled for (its folder's name is their digest)."""
    return {"part": part, "weights": weights, "dtype": str(dtype).removeprefix("torch."),
            "inputs": [[list(tensor.shape), str(tensor.dtype).removeprefix("torch.")] for tensor in inputs],
            **settings, **environment_fields(device)}


def folder_name(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True)
    return f"{fields['part']}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


@contextlib.contextmanager
def _without_gradients(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s parameters with ``requires_grad`` off while it is exported: export copies the flag onto
    its fake parameters, which it may not set on weights made under ``torch.inference_mode`` (a detector
    loaded inside it); set back afterwards, inside inference mode, where that is allowed."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        with torch.inference_mode():
            for parameter, flag in flags:
                parameter.requires_grad_(flag)


def build_package(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], folder: Path, fields: dict[str, Any]
                  ) -> None:
    """Export ``module`` at ``inputs`` and compile it, weights frozen in, into ``folder`` (atomically: a
    temporary folder renamed at the end, so a killed build leaves no package)."""
    temporary = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        # no_grad, not inference_mode (the caller's): export traces ordinary tensors, and inductor packs
        # weights for oneDNN only with gradients off (with them on, measured: slower than eager)
        with torch.inference_mode(False), torch.no_grad(), _without_gradients(module):
            examples = tuple(tensor.clone() for tensor in inputs)  # ordinary copies of inference tensors
            program = torch.export.export(module, examples, strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(temporary / PACKAGE),
                                                     inductor_configs={"freezing": True})
        (temporary / KEY).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def load_or_build(fields: dict[str, Any], mode: str, module: Callable[[], torch.nn.Module],
                  inputs: tuple[torch.Tensor, ...], root: Path | None = None) -> Callable[..., Any] | None:
    """The package for ``fields`` from the cache, built first in ``build`` mode (also over a damaged one);
    None in ``auto`` mode when there is none usable (the caller runs eager).  Processes building the same
    package wait for each other."""
    route_compiler_logs()
    root = root or cache_root()
    folder = root / folder_name(fields)
    loaded = _load(folder, fields)
    if loaded is not None or mode != "build":
        if loaded is None and not (folder / PACKAGE).is_file():  # serve and watch sum it up (PrecompiledParts.status)
            logger.debug("no precompiled %s for this model on this machine in %s: it runs eager", fields["part"], root)
        return loaded
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{folder.name}.lock")):
        if (loaded := _load(folder, fields, say=False)) is not None:  # built by another process meanwhile
            return loaded
        shutil.rmtree(folder, ignore_errors=True)  # a damaged or foreign one, if any
        logger.info("compiling the %s ahead of time into %s (once per model and machine; minutes)", fields["part"],
                    folder)
        start = time.perf_counter()
        build_package(module(), inputs, folder, fields)
        logger.info("compiled the %s in %.0f s", fields["part"], time.perf_counter() - start)
    return _load(folder, fields)


def _load(folder: Path, fields: dict[str, Any], say: bool = True) -> Callable[..., Any] | None:
    """The package in ``folder``; None when there is none, or (said in the log) when it is not the one
    ``fields`` ask for or cannot be loaded (damaged, or written by another torch): that part runs eager."""
    if not (folder / PACKAGE).is_file():
        return None
    start = time.perf_counter()
    try:
        recorded = json.loads((folder / KEY).read_text())
        if recorded != json.loads(json.dumps(fields)):  # a folder copied under another's name
            raise ValueError("its key.json is for other settings")
        loaded = torch._inductor.aoti_load_package(str(folder / PACKAGE))
    except Exception as exc:  # whatever a damaged package raises, a start-up goes on eager
        if say:
            logger.warning("the precompiled %s in %s cannot be used (%s): it runs eager; `clipfusion compile` "
                           "builds it again", fields["part"], folder,
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    logger.debug("loaded the precompiled %s from %s in %.1f s", fields["part"], folder, time.perf_counter() - start)
    return loaded


class CapturingUnetPass(torch.nn.Module):
    """The encoder's partial UNet pass as a module to export: (sample (N, 4, h, w), timestep (N,), context
    (N, 77, D)) → ({layer: (N, h_l·w_l, 77) head-averaged probabilities of every token}, {block: (N, C, h_j,
    w_j) up-block features})."""

    def __init__(self, encoder: Encoder, unet_pass: UnetPass, last_block: str, feature_blocks: Sequence[int]) -> None:
        super().__init__()
        self.encoder, self.unet, self.unet_pass = encoder, encoder.unet, unet_pass
        self.last_block, self.feature_blocks = last_block, list(feature_blocks)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        state = self.encoder._state
        state.maps, state.token_indices, state.active = {}, None, True
        features = self.unet_pass(self.unet, sample, timestep, context, self.last_block, self.feature_blocks)
        return dict(state.maps), features


class VaeLatents(torch.nn.Module):
    """``vae_latents`` as a module to export: (1, 3, S, S) pixels → (1, 4, S/8, S/8) latents."""

    def __init__(self, vae: torch.nn.Module, vae_pass: VaePass) -> None:
        super().__init__()
        self.vae, self.vae_pass = vae, vae_pass

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae_pass(self.vae, pixels)


class PrecompiledParts:
    """The UNet pass and the VAE encoder of one ``DiffusionEncoder`` through packages, one per set of
    shapes and read-out; a part without a package (``auto``) runs eager, through ``unet_pass`` and
    ``vae_pass`` (``partial_unet_forward``, ``vae_latents``: also what is exported).  Drop-in for the
    encoder's ``_unet_forward`` and ``_vae_latents``."""

    def __init__(self, encoder: Encoder, mode: str, unet_pass: UnetPass, vae_pass: VaePass,
                 root: Path | None = None) -> None:
        self.encoder, self.mode, self.root = encoder, mode, root
        self.unet_pass, self.vae_pass = unet_pass, vae_pass
        self._packages: dict[str, Callable[..., Any] | None] = {}  # folder name → package (None: eager)
        self.missing: list[str] = []  # the folders that had no package when first needed (built in build mode)

    @property
    def folders(self) -> list[Path]:
        """The folders of the packages in use (loaded or built), in the order they were first needed."""
        root = self.root or cache_root()
        return [root / name for name, package in self._packages.items() if package is not None]

    def status(self, model: str) -> str | None:
        """One line for a start-up log on the parts looked up so far (None: none yet): which run from a
        package, which eager, and how ``model``'s packages get built."""
        if not self._packages:
            return None
        parts = {name: name.split("-")[0] for name in self._packages}
        used = [parts[name] for name, package in self._packages.items() if package is not None]
        eager = [parts[name] for name, package in self._packages.items() if package is None]
        line = f"{' and '.join(used)} precompiled ({self.root or cache_root()})" if used else ""
        if eager:
            them = "them" if len(eager) > 1 else "it"
            line += ("; " if line else "") + (f"{' and '.join(eager)} eager: not precompiled for this machine "
                                              f"(`clipfusion compile --model {model}` builds {them} once, minutes; "
                                              "where it pays: docs/speed.md#precompiled-parts)")
        return line

    @functools.cached_property
    def unet_weights(self) -> str:
        return weights_digest(self.encoder.unet)

    @functools.cached_property
    def vae_weights(self) -> str:
        return weights_digest(self.encoder.vae)

    def _package(self, fields: dict[str, Any], module: Callable[[], torch.nn.Module],
                 inputs: tuple[torch.Tensor, ...]) -> Callable[..., Any] | None:
        name = folder_name(fields)
        if name not in self._packages:
            if not (self.root or cache_root()).joinpath(name, PACKAGE).is_file():
                self.missing.append(name)
            self._packages[name] = load_or_build(fields, self.mode, module, inputs, self.root)
        return self._packages[name]

    def unet_forward(self, unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     last_block: str, feature_blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """``partial_unet_forward``'s contract: the features returned, the maps left in the encoder's
        capture state (only the token columns it selects)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # an export of the detector traces eager code
            return self.unet_pass(unet, sample, timestep, context, last_block, feature_blocks)
        encoder = self.encoder
        inputs = (sample, timestep, context)
        fields = package_fields("unet", self.unet_weights, encoder.dtype, encoder.device, inputs,
                                last_block=last_block, feature_blocks=list(feature_blocks),
                                layers=sorted(encoder.layer_names))
        package = self._package(fields, lambda: CapturingUnetPass(encoder, self.unet_pass, last_block, feature_blocks),
                                inputs)
        if package is None:
            return self.unet_pass(unet, sample, timestep, context, last_block, feature_blocks)
        state = encoder._state
        token_indices, active = state.token_indices, state.active  # the export's trace resets them
        maps, features = package(*inputs)
        if active:
            state.maps = maps if token_indices is None else {name: value[..., token_indices]
                                                              for name, value in maps.items()}
        state.token_indices, state.active = token_indices, active
        return {int(block): value for block, value in features.items()}

    def vae_latents(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.vae_pass(vae, pixels)
        fields = package_fields("vae", self.vae_weights, pixels.dtype, pixels.device, (pixels,))
        package = self._package(fields, lambda: VaeLatents(vae, self.vae_pass), (pixels,))
        return self.vae_pass(vae, pixels) if package is None else package(pixels)
