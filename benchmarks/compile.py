"""What ``torch.compile`` (inductor, CPU) and the memory layout buy per model part, in one process.

Full-size architectures with random weights (speed does not depend on weights), batch 1, float32:
the CLIP image tower (240 px), the TAESD encoder (256 px, fast), the SD VAE encoder (512 px,
paper-recon) and clipfusion's own UNet pass with attention capture (``DiffusionEncoder.run_unet``:
the explicit partial forward up to the last block read; fast = latent 32², one joint-prompt row;
paper-recon = latent 64², one row per state prompt).

Per part: eager in channels-first and channels-last layout and channels-last with the convolution
weights packed once (``clipfusion.encoders.prepacking``, what clipfusion runs eager on a CPU;
convolutional parts only), then
compiled in the layout clipfusion loads it in (UNet and VAEs channels-last, CLIP as it is), twice:
inductor's defaults, and with ``freezing`` (weights folded in as constants, so convolution and
linear weights are packed for oneDNN once instead of at every call; what ``--compile`` uses).  For
each: the first compiled call's time (cold caches: inductor's caches are disabled) and the steady
state, plus the graph breaks ``torch._dynamo.explain`` finds.  Figures that are compared are taken
interleaved (one call of each per round, median over the rounds), because this kind of shared
machine drifts by up to 1.5x within minutes: the two layouts, and plain against packed, before
anything compiles, and each compiled mode against plain eager in the loaded layout right after its
compile (inductor's compile workers are idle by then).

Usage: python benchmarks/compile.py [--parts clip taesd sd-vae unet-fast unet-paper] [--repeats 3]
                                   [--modes [compiled compiled_frozen]] [--out benchmarks/results/compile.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # cold compile times, before torch loads

import torch
from _common import interleaved_median_ms

from clipfusion.config import Preset, RuntimeConfig
from clipfusion.encoders import cache, diffusion
from clipfusion.encoders.diffusion import DiffusionEncoder
from clipfusion.encoders.prepacking import PrepackedConv2d
from clipfusion.tasks.benchmark import machine_info, random_weight_preset

MODES = {"compiled": {}, "compiled_frozen": {"freezing": True}}  # inductor settings per mode


@dataclass
class Part:
    """One model part: ``run(options)`` calls it once, eager (None) or through ``torch.compile(options=...)``,
    compiled at the first call with those options."""

    name: str
    run: Callable[[dict[str, Any] | None], Any]
    layout_module: torch.nn.Module | None  # the module whose memory layout is switched, None: no convolutions
    loaded_layout: torch.memory_format
    explain: Callable[[], Any]  # torch._dynamo.explain's output for the compiled function


class Compiled:
    """``function`` compiled once per mode (static shapes), run with that mode's inductor settings patched
    in for the whole call: dynamo reads ``freezing`` while tracing, before torch.compile's ``options``
    would reach inductor."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.compiled: dict[str, Callable[..., Any]] = {}

    def get(self, options: dict[str, Any] | None) -> Callable[..., Any]:
        if options is None:
            return self.function
        key = json.dumps(options, sort_keys=True)
        if key not in self.compiled:
            compiled = torch.compile(self.function, dynamic=False)

            def run(*args: Any, settings: dict[str, Any] = options, compiled: Any = compiled) -> Any:
                with torch._inductor.config.patch(**settings):
                    return compiled(*args)

            self.compiled[key] = run
        return self.compiled[key]


def module_part(name: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], convolutional: bool) -> Part:
    forward = Compiled(module)
    return Part(name, lambda options: forward.get(options)(*inputs), module if convolutional else None,
                torch.channels_last if convolutional else torch.contiguous_format,
                lambda: torch._dynamo.explain(module)(*inputs))


def unet_part(name: str, encoder: DiffusionEncoder, prompts: list[str]) -> Part:
    """``run_unet`` as clipfusion runs it; compiled = its partial forward through ``torch.compile``."""
    side = encoder.latent_size
    latents = torch.randn(1, 4, side, side)
    eager_forward = diffusion.partial_unet_forward
    forward = Compiled(eager_forward)

    def run(options: dict[str, Any] | None) -> Any:
        encoder._unet_forward = forward.get(options)  # what run_unet calls (--compile sets it the same way)
        try:
            return encoder.run_unet(latents, prompts, token_indices=[1, 2])
        finally:
            encoder._unet_forward = eager_forward

    def explain() -> Any:
        rows = len(prompts)
        timesteps = torch.full((rows,), encoder.config.timestep)
        context = encoder.encode_prompts(prompts)
        blocks = list(encoder.config.feature_blocks)
        return torch._dynamo.explain(eager_forward)(encoder.unet, latents.repeat(rows, 1, 1, 1), timesteps, context,
                                                   encoder.last_block(blocks), blocks)

    return Part(name, run, encoder.unet, torch.channels_last, explain)


LAYOUTS = {"eager_ms": torch.contiguous_format, "eager_channels_last_ms": torch.channels_last}  # result key: layout
PACKING = {"eager_plain_ms": torch.nn.Conv2d, "eager_prepacked_ms": PrepackedConv2d}  # result key: convolution class


def _switch_layout(module: torch.nn.Module, key: str) -> None:
    module.to(memory_format=LAYOUTS[key])


def _switch_packing(module: torch.nn.Module, key: str) -> None:
    for child in module.modules():
        if isinstance(child, torch.nn.Conv2d):  # the class only: a packed weight stays for the next round
            child.__class__ = PACKING[key]


def measure(parts: list[Part], repeats: int, modes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for part in parts:  # eager layouts, interleaved, before anything compiles
            result: dict[str, Any] = {"part": part.name}
            if part.layout_module is None:
                result["eager_ms"] = interleaved_median_ms({"eager": functools.partial(part.run, None)},
                                                           repeats)["eager"]
            else:
                module = part.layout_module
                _switch_packing(module, "eager_plain_ms")
                result |= interleaved_median_ms({key: functools.partial(part.run, None) for key in LAYOUTS}, repeats,
                                                before=functools.partial(_switch_layout, module))
                module.to(memory_format=part.loaded_layout)
                # packed against plain in the loaded layout, interleaved by switching the class
                result |= interleaved_median_ms({key: functools.partial(part.run, None) for key in PACKING}, repeats,
                                                before=functools.partial(_switch_packing, module))
                result["eager_prepacked_speedup"] = round(result["eager_plain_ms"] / result["eager_prepacked_ms"], 2)
                _switch_packing(module, "eager_plain_ms")  # compiled figures stay against plain eager, as before
            result["loaded_layout"] = "channels_last" if part.loaded_layout == torch.channels_last else "channels_first"
            results[part.name] = result
            print(json.dumps(result), flush=True)
        for part in parts:
            result = results[part.name]
            explained = part.explain()
            result["graph_breaks"] = explained.graph_break_count
            result["break_reasons"] = sorted({str(reason.reason).splitlines()[0] for reason in explained.break_reasons})
            for mode, options in modes.items():
                torch._dynamo.reset()
                start = time.perf_counter()
                part.run(options)
                result[f"{mode}_first_call_s"] = round(time.perf_counter() - start, 1)
                # against eager in the loaded layout, measured in the same rounds
                figures = interleaved_median_ms({"eager": functools.partial(part.run, None),
                                                 mode: functools.partial(part.run, options)}, repeats)
                result[f"{mode}_ms"], result[f"{mode}_eager_ms"] = figures[mode], figures["eager"]
                result[f"{mode}_speedup"] = round(figures["eager"] / figures[mode], 2)
            print(json.dumps(result), flush=True)
    return list(results.values())


PARTS: dict[str, Callable[[Preset, Preset, RuntimeConfig], Part]] = {
    "clip": lambda fast, _, runtime: module_part(
        "CLIP ViT-B-16-plus-240 image tower", cache.clip_encoder(fast.clip, runtime).model.visual,
        (torch.randn(1, 3, 240, 240),), convolutional=False),
    "taesd": lambda fast, _, runtime: module_part(
        "TAESD encoder, 256 px (fast)", cache.diffusion_encoder(fast.diffusion, runtime).vae.encoder,
        (torch.randn(1, 3, 256, 256),), convolutional=True),
    "sd-vae": lambda _, paper, runtime: module_part(
        "SD VAE encoder, 512 px (paper-recon)", cache.diffusion_encoder(paper.diffusion, runtime).vae.encoder,
        (torch.randn(1, 3, 512, 512),), convolutional=True),
    "unet-fast": lambda fast, _, runtime: unet_part(
        "UNet pass with capture, latent 32², 1 joint prompt (fast)", cache.diffusion_encoder(fast.diffusion, runtime),
        ["a photo of a flawless or damaged object"]),
    "unet-paper": lambda _, paper, runtime: unet_part(
        "UNet pass with capture, latent 64², 2 prompts (paper-recon)",
        cache.diffusion_encoder(paper.diffusion, runtime),
        ["a photo of a flawless object", "a photo of a damaged object"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="measure only these; the other parts' results already in --out are kept")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES,
                        help="compile modes to measure (none: eager figures only); figures of other modes "
                             "already in --out are kept")
    args = parser.parse_args()
    runtime = RuntimeConfig("cpu", "float32")
    fast, paper = random_weight_preset("fast"), random_weight_preset("paper-recon")
    parts = {key: PARTS[key](fast, paper, runtime) for key in args.parts}
    runs = measure(list(parts.values()), args.repeats, {mode: MODES[mode] for mode in args.modes})
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    kept = {run["part"]: run for run in earlier["runs"]}
    for run in runs:  # an earlier run's figures of the modes not measured now stay
        kept[run["part"]] = {**kept.get(run["part"], {}), **run}
    runs = list(kept.values())
    # a merged file keeps its note, which says which figures came from which run (edit it by hand)
    note = earlier.get("note") or (f"batch 1, float32, random weights; ms per call, median of {args.repeats} "
                                   "interleaved rounds after a warm-up round; compiled in the loaded layout; "
                                   "each speed-up over plain eager in the loaded layout from the same rounds "
                                   "(<mode>_eager_ms)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "machine": machine_info(runtime), "note": note}, indent=2) + "\n")


if __name__ == "__main__":
    main()
