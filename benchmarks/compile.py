"""What ``torch.compile`` (inductor, CPU) buys per model part: compile time and steady-state time
against eager, in one process, full-size architectures with random weights (speed does not depend
on weights).  Parts: the CLIP image tower (240 px), the SD VAE encoder (512 px, paper-recon), the
TAESD encoder (256 px, fast) and a full SD1.5 UNet forward at latent 32² (fast), batch 1, float32.

The UNet is compiled without clipfusion's attention capture and early stop: that path stops the
UNet by raising from a hook, which dynamo cannot trace, so it is not compile-ready yet; the figure
here bounds what compiling it could give.
Compile times are cold: inductor's caches are disabled (a warm cache makes later starts faster).
Usage: python benchmarks/compile.py [--out benchmarks/results/compile.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # cold compile times, before torch loads

import torch

from clipfusion.config import RuntimeConfig
from clipfusion.encoders import cache
from clipfusion.tasks.benchmark import machine_info, random_weight_preset


def median_ms(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(parts: list[tuple[str, torch.nn.Module, tuple[Any, ...]]], repeats: int) -> list[dict[str, Any]]:
    """Every part eager first, then every part compiled: inductor's compile workers must not run while
    an eager figure is taken."""
    results = []
    with torch.inference_mode():
        eager = {}
        for name, module, inputs in parts:
            module(*inputs)  # warm-up
            eager[name] = median_ms(lambda m=module, i=inputs: m(*i), repeats)
        for name, module, inputs in parts:
            compiled = torch.compile(module)
            start = time.perf_counter()
            compiled(*inputs)
            compile_seconds = time.perf_counter() - start
            fast = median_ms(lambda c=compiled, i=inputs: c(*i), repeats)
            result = {"part": name, "eager_ms": round(eager[name]), "compiled_ms": round(fast),
                      "speedup": round(eager[name] / fast, 2), "compile_s": round(compile_seconds, 1)}
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runtime = RuntimeConfig("cpu", "float32")
    fast, paper = random_weight_preset("fast"), random_weight_preset("paper-recon")
    clip = cache.clip_encoder(fast.clip, runtime)
    taesd = cache.diffusion_encoder(fast.diffusion, runtime)
    sd = cache.diffusion_encoder(paper.diffusion, runtime)
    runs = measure([
        ("CLIP ViT-B-16-plus-240 image tower", clip.model.visual, (torch.randn(1, 3, *clip.image_size),)),
        ("SD VAE encoder, 512 px", sd.vae.encoder, (torch.randn(1, 3, 512, 512),)),
        ("TAESD encoder, 256 px", taesd.vae.encoder, (torch.randn(1, 3, 256, 256),)),
        ("SD1.5 UNet forward, latent 32x32, 2 prompts", taesd.unet,
         (torch.randn(2, 4, 32, 32), torch.tensor([100, 100]), torch.randn(2, 77, 768))),
    ], args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "machine": machine_info(runtime)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
