"""The Ray driver's memory over a long ``predict --engine ray`` run: its resident set sampled while it
inspects N images, so a reorder buffer (or anything else) that grows with the run shows.

The images are small synthetic PNGs scored by the mean-image baseline: the model costs almost nothing,
so the run is as long in images as possible for its minutes, and the pipeline (decoding tasks, the
inspecting actor, rendering tasks, the driver writing rows and files) is what is measured.  The driver's
RSS (and its private part) is read from /proc every 0.5 s; the figures are the values at each tenth of
the rows written.
Usage: python benchmarks/ray_memory.py [--images 10000] [--out benchmarks/results/ray_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# This folder, first on a script's path, holds ray.py: it must not shadow the ray package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from clipfusion.config import RuntimeConfig  # noqa: E402
from clipfusion.tasks.benchmark import machine_info  # noqa: E402


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident set, its private part): RssAnon leaves out the shared pages of Ray's object store that the
    driver maps while it reads results, which the kernel reclaims and the store reuses."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024


def rows_written(out: Path) -> int:
    try:
        return (out / "results.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/ray_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for index in range(args.images):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{index:05d}.png")
        out = Path(folder) / "out"
        command = [str(Path(sys.executable).with_name("clipfusion")), "predict", str(images), "--method", "mean-image",
                   "--engine", "ray", "--out", str(out), "--batch-size", str(args.batch_size), "--quiet"]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        samples: list[tuple[float, int, float, float]] = []
        while process.poll() is None:
            try:
                samples.append((time.perf_counter() - start, rows_written(out), *memory_mb(process.pid)))
            except OSError:
                break
            time.sleep(0.5)
        stderr = process.communicate()[1]
        if process.returncode != 0:
            raise SystemExit(f"predict failed ({process.returncode}): {stderr[-2000:]}")
        seconds = time.perf_counter() - start
    marks = []
    for tenth in range(1, 11):
        target = args.images * tenth // 10
        reached = [sample for sample in samples if sample[1] >= target] or samples[-1:]
        marks.append({"rows": target, "seconds": round(reached[0][0], 1), "driver_rss_mb": round(reached[0][2]),
                      "driver_private_mb": round(reached[0][3])})
    started = [sample for sample in samples if sample[1] > 0]
    result = {"images": args.images, "batch_size": args.batch_size, "wall_s": round(seconds, 1),
              "driver_rss_mb_first_rows": round(started[0][2]) if started else None,
              "driver_rss_mb_peak": round(max(sample[2] for sample in samples)),
              "driver_private_mb_first_rows": round(started[0][3]) if started else None,
              "driver_private_mb_peak": round(max(sample[3] for sample in samples)), "by_tenth": marks,
              "machine": machine_info(RuntimeConfig()),
              "note": "predict --engine ray --method mean-image on 48x48 PNGs (local Ray started by the command); "
                      "driver RSS and its private part (RssAnon) from /proc every 0.5 s"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "machine"}, indent=2))


if __name__ == "__main__":
    main()
