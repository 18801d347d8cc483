"""A roofline of clipfusion's stages (and WinCLIP whole) on this CPU: per stage, its FLOPs, the time it takes and the
GFLOP/s it reaches, against the machine's measured peak (a large matrix product), in float32 and
bfloat16; then the peak RSS of each preset alone, with and without the packed UNet weights.

- FLOPs are counted with torch's ``FlopCounterMode`` (matrix products, convolutions, attention) on
  the stage's own call, with plain convolutions (the packed ones are oneDNN calls it does not count;
  they do the same arithmetic).  Elementwise work (norms, activations, softmax) is not counted: a
  stage far below the peak may be spending its time there.
- Times: median of ``--repeats`` calls after a warm-up, eager as clipfusion runs it (UNet weights
  packed on x86), batch 1.  The peak: ``torch.mm`` of two square matrices, median of the repeats, the
  best of a few sizes (oneDNN's convolutions may still beat it: a share above 1 says so).
- Peak RSS: each preset in a fresh process (``--rss``), loading its models (random weights) and
  scoring one image; ``fast`` and ``paper-recon``, with ``CLIPFUSION_PREPACK=1`` (the default) and ``0``,
  in each of ``--rss-dtypes``; also the resident size once loaded, the peak while scoring, and each
  part's weight bytes.

Full-size architectures with random weights.  On a CPU without native bfloat16 (AVX2 only) torch
emulates it: the bf16 peak there says how slow emulation is, not what bf16 hardware reaches.

Usage: python benchmarks/roofline.py [--repeats 3] [--dtypes float32 bfloat16] [--no-rss]
                                     [--rss-presets fast paper-recon] [--rss-dtypes float32 bfloat16]
                                     [--out benchmarks/results/roofline.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import median_ms
from torch.utils.flop_counter import FlopCounterMode

from clipfusion.config import RuntimeConfig
from clipfusion.encoders import cache
from clipfusion.encoders.prepacking import PrepackedConv2d
from clipfusion.methods.winclip import WinCLIP
from clipfusion.tasks.benchmark import PROC_STATUS, _peak_rss_mb, random_weight_preset

FAST_PROMPTS = ["a photo of a flawless or damaged object"]  # fast's one joint state prompt
PAPER_PROMPTS = ["a photo of a flawless object", "a photo of a damaged object"]


def peak_gflops(dtype: torch.dtype, side: int, repeats: int) -> float:
    """GFLOP/s of ``torch.mm`` on (side, side) matrices: what this CPU reaches on the friendliest work."""
    a, b = torch.randn(side, side, dtype=dtype), torch.randn(side, side, dtype=dtype)
    return 2 * side**3 / (median_ms(lambda: torch.mm(a, b), repeats) / 1000) / 1e9


def _plain_convolutions(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Switch packed convolutions to plain ones (for the flop counter); the switched, to switch back."""
    switched: list[torch.nn.Module] = [child for child in module.modules() if isinstance(child, PrepackedConv2d)]
    for child in switched:
        child.__class__ = torch.nn.Conv2d
    return switched


def stages(dtype: str) -> dict[str, tuple[Callable[[], Any], torch.nn.Module]]:
    """Stage → (one call at batch 1, the module whose convolutions it runs)."""
    runtime = RuntimeConfig("cpu", dtype)
    fast, paper = random_weight_preset("fast"), random_weight_preset("paper-recon")
    torch_dtype = getattr(torch, dtype)
    clip = cache.clip_encoder(fast.clip, runtime).model.visual
    fast_diffusion = cache.diffusion_encoder(fast.diffusion, runtime)
    paper_diffusion = cache.diffusion_encoder(paper.diffusion, runtime)
    clip_pixels = torch.randn(1, 3, 240, 240, dtype=torch_dtype)
    fast_pixels = torch.randn(1, 3, 256, 256, dtype=torch_dtype)
    paper_pixels = torch.randn(1, 3, 512, 512, dtype=torch_dtype)
    fast_latents = torch.randn(1, 4, 32, 32, dtype=torch_dtype)
    paper_latents = torch.randn(1, 4, 64, 64, dtype=torch_dtype)
    winclip = WinCLIP(fast, runtime, batch_size=1)
    image = np.full((256, 256, 3), 128, np.uint8)
    return {
        "WinCLIP, whole image, 0-shot (the baseline)": (lambda: winclip.predict([image], "object"), clip),
        "CLIP ViT-B-16-plus-240 image tower (both presets)": (lambda: clip(clip_pixels), clip),
        "TAESD encoder, 256 px (fast)": (lambda: fast_diffusion.encode_latents(fast_pixels), fast_diffusion.vae),
        "SD VAE encoder, 512 px (paper-recon)": (lambda: paper_diffusion.encode_latents(paper_pixels),
                                                 paper_diffusion.vae),
        "UNet pass with capture, latent 32², 1 row (fast)": (
            lambda: fast_diffusion.run_unet(fast_latents, FAST_PROMPTS, token_indices=[1, 2]), fast_diffusion.unet),
        "UNet pass with capture, latent 64², 2 rows (paper-recon)": (
            lambda: paper_diffusion.run_unet(paper_latents, PAPER_PROMPTS, token_indices=[1, 2]),
            paper_diffusion.unet),
    }


def measure(dtype: str, repeats: int, peak: float) -> list[dict[str, Any]]:
    rows = []
    with torch.inference_mode():
        for name, (call, module) in stages(dtype).items():
            switched = _plain_convolutions(module)
            counter = FlopCounterMode(display=False)
            with counter:
                call()
            for child in switched:
                child.__class__ = PrepackedConv2d
            flops = counter.get_total_flops()
            seconds = median_ms(call, repeats) / 1000
            achieved = flops / seconds / 1e9
            row = {"stage": name, "dtype": dtype, "gflop": round(flops / 1e9, 2), "ms": round(1000 * seconds, 1),
                   "gflops_per_s": round(achieved, 1), "share_of_peak": round(achieved / peak, 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def rss_of_preset(preset: str, dtype: str) -> None:
    """In a fresh process: load ``preset`` (random weights) in ``dtype``, score one image, print what it held.

    Random weights are made in float32 and then cast, which a real load (safetensors read in the run's
    precision) does not do: so besides the peak of the whole process, the resident size once loaded and the
    peak while scoring (from the loaded size up) are given, and the bytes of each part's weights."""
    from clipfusion.methods.clipfusion.detector import CLIPFusion
    from clipfusion.tasks.benchmark import _reset_peak_rss

    detector = CLIPFusion(random_weight_preset(preset), RuntimeConfig("cpu", dtype), batch_size=1)
    patchclip, mapdiff = detector._branches()
    parts = {"clip": patchclip.encoder.model, "unet": mapdiff.encoder.unet, "vae": mapdiff.encoder.vae,
             "text_encoder": mapdiff.encoder.text_encoder}
    weights = {name: round(sum(t.numel() * t.element_size() for t in part.state_dict().values()) / 2**20)
               for name, part in parts.items()}
    # VmHWM and VmRSS, not getrusage's ru_maxrss: a child started by exec keeps its parent's peak in the latter
    load_peak, loaded = _peak_rss_mb(), _rss_mb()
    _reset_peak_rss()
    detector.predict([np.full((256, 256, 3), 128, np.uint8)], "object")
    score_peak = _peak_rss_mb()
    print(json.dumps({"peak_rss_mb": round(max(load_peak, score_peak)), "loaded_rss_mb": round(loaded),
                      "scoring_peak_rss_mb": round(score_peak), "weights_mb": weights}))


def _rss_mb() -> float:
    line = next(line for line in PROC_STATUS.read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=("float32", "bfloat16"),
                        help="the stages' precisions, none for no stages (bfloat16 emulated on an AVX2-only CPU "
                             "takes an hour)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-preset peak RSS")
    parser.add_argument("--rss-presets", nargs="+", default=["fast", "paper-recon"], choices=("fast", "paper-recon"))
    parser.add_argument("--rss-dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"),
                        help="the precisions each preset's RSS is measured in (packing is float32's only)")
    parser.add_argument("--out", default="benchmarks/results/roofline.json")
    parser.add_argument("--rss", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        return rss_of_preset(*args.rss)
    from _common import write_results

    # both peaks always (bf16's also says how slow emulation is where the CPU lacks it), the best of a few
    # sizes (a 2048² product reached only 0.8× of what the UNet's convolutions reach here); the stages in --dtypes
    peaks = {dtype: round(max(peak_gflops(getattr(torch, dtype), side, args.repeats) for side in sides), 1)
             for dtype, sides in (("float32", (2048, 4096, 6144)), ("bfloat16", (1024,)))}
    print(json.dumps({"peak_gflops_per_s": peaks}), flush=True)
    rows = [row for dtype in args.dtypes for row in measure(dtype, args.repeats, peaks[dtype])]
    memory = []
    if not args.no_rss:
        for preset in args.rss_presets:
            for dtype, prepack in [(d, p) for d in args.rss_dtypes for p in ("1", "0") if d == "float32" or p == "0"]:
                done = subprocess.run([sys.executable, __file__, "--rss", preset, dtype], capture_output=True,
                                      text=True, env={**os.environ, "CLIPFUSION_PREPACK": prepack}, check=True)
                row = {"preset": preset, "dtype": dtype, "packed_unet_weights": prepack == "1",
                       **json.loads(done.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                memory.append(row)
    write_results(args.out, rows, peak_gflops_per_s=peaks, peak_rss=memory,
                  command=" ".join(["python", "benchmarks/roofline.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
