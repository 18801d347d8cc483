"""Time and peak memory of the pixel metrics for one MVTec-size category (150 maps).

Each size runs in a fresh subprocess so that its peak RSS is its own.
Usage: python benchmarks/metrics.py [--sizes 256 1024] [--images 150] [--out benchmarks/results/metrics.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

from _common import run_isolated, write_results


def measure(size: int, images: int) -> dict:
    import numpy as np

    from clipfusion.evaluation.metrics import _curve_metrics, _legacy_aupro, _rank_pixels

    rng = np.random.default_rng(0)
    masks = np.zeros((images, size, size), bool)
    for i in range(0, images, 2):  # half the images anomalous, one to three regions each
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, size * 3 // 4, 2)
            masks[i, y:y + size // 10, x:x + size // 8] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.5 * masks).astype(np.float32)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    ranking = _rank_pixels(masks, maps)
    curves = _curve_metrics(ranking, 0.3)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    _legacy_aupro(ranking)
    legacy_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "size": size, "images": images, "pixels": int(masks.size),
        "auroc_ap_f1_aupro_seconds": round(exact_s, 2), "legacy_aupro_seconds": round(legacy_s, 2),
        "inputs_mb": round((maps.nbytes + masks.nbytes) / 2**20), "peak_rss_mb": round(peak),
        "metrics_extra_rss_mb": round(peak - base_rss), "pixel_aupro": round(curves["pixel_aupro"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--out", default="benchmarks/results/metrics.json")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.images)))
        return
    runs = [run_isolated(__file__, ["--one", str(size), "--images", str(args.images)]) for size in args.sizes]
    write_results(args.out, runs)

if __name__ == "__main__":
    main()
