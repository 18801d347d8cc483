"""Per-stage CPU time and peak memory of the encoders: tiny and full-size (random weights).

Speed does not depend on weight values, so full-size architectures are built from the shipped
configs with random weights (no download).  Each model size runs in its own subprocess so its peak
RSS is its own.  Times are medians over --repeats after one warm-up, in milliseconds per call.

Usage: python benchmarks/encoders.py [--sizes tiny full] [--repeats 3] [--out benchmarks/results/encoders.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

from _common import median_ms, run_isolated, write_results

SIZES = {
    "tiny": {"clip": ("tiny", None), "diffusion": ("tiny-unet", "sd-vae", "tiny-text-encoder"), "image_size": 128},
    "full": {"clip": ("ViT-B-16-plus-240", None),
             "diffusion": ("sd15-unet", "sd-vae", "sd15-text-encoder"), "image_size": 512},
}


def measure(size: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from clipfusion.config import ClipConfig, DiffusionConfig, RuntimeConfig
    from clipfusion.encoders import ClipEncoder, DiffusionEncoder
    from clipfusion.encoders.loading import build_diffusion_from_configs, load_open_clip
    from clipfusion.prompts import state_ensembles

    spec = SIZES[size]
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    clip = ClipEncoder(load_open_clip(ClipConfig(*spec["clip"]), RuntimeConfig("cpu", "float32")))
    unet, vae, text = spec["diffusion"]
    if size == "tiny":
        vae = "tiny-vae"
    config = DiffusionConfig(model_id="tiny" if size == "tiny" else "configs", image_size=spec["image_size"])
    diffusion = DiffusionEncoder(build_diffusion_from_configs(unet, vae, text), config)
    build_s = time.perf_counter() - start

    image = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    clip_pixels = clip.preprocess([image])
    sd_pixels = diffusion.preprocess([image])
    normal, anomalous = state_ensembles("bottle")
    prompts = ["a photo of a flawless bottle", "a photo of a damaged bottle"]

    def text_ensemble():
        clip._text_cache.clear()
        clip.encode_prompt_ensembles([normal, anomalous])

    def sd_text():
        diffusion._text_cache.clear()
        diffusion.encode_prompts(prompts)

    stages = {
        "clip_image": median_ms(lambda: clip.encode_image(clip_pixels, dense=False), repeats),
        "clip_image_with_dense_vv": median_ms(lambda: clip.encode_image(clip_pixels, blocks=[-1]), repeats),
        "clip_text_ensemble_uncached": median_ms(text_ensemble, repeats),
        "sd_text_encoder_2_prompts_uncached": median_ms(sd_text, repeats),
        "vae_encode": median_ms(lambda: diffusion.encode_latents(sd_pixels), repeats),
    }
    latents = diffusion.encode_latents(sd_pixels)
    diffusion.encode_latents = lambda _pixels: latents  # time the UNet alone below
    for n_prompts in (1, 2):
        for early in (False, True):
            name = f"unet_{n_prompts}_prompt{'s' if n_prompts > 1 else ''}_{'early_stop' if early else 'full'}"
            stages[name] = median_ms(
                lambda n=n_prompts, e=early: diffusion.encode(sd_pixels, prompts[:n], token_indices=[5], stop_early=e),
                repeats,
            )
    return {
        "size": size,
        "clip": f"{spec['clip'][0]} ({clip.image_size[0]} px)",
        "diffusion": f"{unet}+{vae}+{text} ({spec['image_size']} px)",
        "build_seconds": round(build_s, 1),
        "ms_per_call_batch_1": stages,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/encoders.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    runs = [run_isolated(__file__, ["--one", size, "--repeats", str(args.repeats)]) for size in args.sizes]
    write_results(args.out, runs, dtype="float32")

if __name__ == "__main__":
    main()
