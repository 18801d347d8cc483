"""The VAE encoder on a CPU: a batch in one call against the same images in smaller calls.

Full-size random weights, float32, channels-last as clipfusion loads them: TAESD at 256 px (`fast`)
on a batch of 8, the SD VAE at 512 px (`paper-recon`) on a batch of 2 (one call takes seconds per
image).  The chunk sizes are measured interleaved (one call of each in turn, per repeat) so drift
on the machine hits them alike; ms per image, median over the repeats after a warm-up round.
Usage: python benchmarks/vae_batch.py [--repeats 5] [--out benchmarks/results/vae_batch.json]
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from _common import interleaved_median_ms

from clipfusion.config import RuntimeConfig
from clipfusion.encoders import cache
from clipfusion.encoders.diffusion import vae_latents
from clipfusion.tasks.benchmark import machine_info, random_weight_preset

CASES = (("TAESD encoder, 256 px (fast)", "fast", 256, 8, (8, 4, 2, 1)),
         ("SD VAE encoder, 512 px (paper-recon)", "paper-recon", 512, 2, (2, 1)))


def _encode_in_chunks(vae: torch.nn.Module, pixels: torch.Tensor, chunk: int) -> None:
    for part in pixels.split(chunk):
        vae_latents(vae, part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/vae_batch.json")
    args = parser.parse_args()
    runtime = RuntimeConfig("cpu", "float32")
    runs = []
    with torch.inference_mode():
        for name, preset, side, batch, chunks in CASES:
            vae = cache.diffusion_encoder(random_weight_preset(preset).diffusion, runtime).vae
            pixels = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
            calls = {str(chunk): functools.partial(_encode_in_chunks, vae, pixels, chunk) for chunk in chunks}
            per_image = {int(chunk): round(ms / batch, 1)
                         for chunk, ms in interleaved_median_ms(calls, args.repeats).items()}
            run = {"part": name, "batch": batch, "ms_per_image_by_chunk": per_image,
                   "one_call_over_single_images": round(per_image[batch] / per_image[1], 2)}
            print(json.dumps(run), flush=True)
            runs.append(run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "machine": machine_info(runtime),
                               "note": f"float32, channels-last, random weights; median of {args.repeats} "
                                       "interleaved rounds after a warm-up; ms per image"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
