"""Throughput of ``predict --engine ray`` against the local engine, in one run on this machine, and the
Ray engine's overhead per batch.

Both engines score the same synthetic images with the same model file (``fast``: full-size
architectures with random weights; ``tiny``: where a batch costs milliseconds, so the overhead
shows).  Steady-state throughput comes from the rows' own timestamps, from the end of the first batch
to the end of the last, so model loading and Ray's start-up are left out (they are reported apart,
as the time to the first row).  The Ray instance is local, with one scoring actor holding 2 CPUs
(torch then runs 2 threads, as the local engine does here) and one CPU for decoding: Ray's CPUs are
scheduling tokens, so it is declared with 3 on this 2-core machine, where decoding and scoring
share the cores as they do in the local engine.
Usage: python benchmarks/ray.py [--presets tiny fast] [--out benchmarks/results/ray.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# This file is called ray.py: its folder, first on the path of a script, must not shadow the ray package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from clipfusion.config import RuntimeConfig  # noqa: E402
from clipfusion.data.synthetic import SyntheticSpec, generate  # noqa: E402
from clipfusion.tasks.benchmark import machine_info  # noqa: E402

# images and batch size per preset: four batches or more, so three are timed after the first
IMAGES = {"tiny": (96, 8), "fast": (32, 8)}
RANDOM_FAST = ["--set", "clip__pretrained=null", "--set", "diffusion__model_id=random:sd15",
               "--set", "diffusion__vae_id=random:taesd"]


def clipfusion_command() -> str:
    return str(Path(sys.executable).with_name("clipfusion"))


def make_model(preset: str, normal: Path, out: Path) -> Path:
    extra = RANDOM_FAST if preset == "fast" else []
    subprocess.run([clipfusion_command(), "fit", "--normal", str(normal), "--category", "disc", "--shots", "0",
                    "--preset", preset, *extra, "--out", str(out), "--quiet"], check=True)
    return out


def images(root: Path, count: int, folder: Path) -> Path:
    """``count`` test images (the synthetic test set repeated under distinct names)."""
    sources = sorted((root / "disc" / "test").rglob("*.png"))
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"{index:04d}.png").write_bytes(sources[index % len(sources)].read_bytes())
    return folder


def timed_run(command: list[str], out: Path, batch_size: int) -> dict[str, float]:
    """Run ``command``; its steady throughput (rows after the first batch over their time) and start-up."""
    start = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - start
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    stamps = sorted(datetime.fromisoformat(row["timestamp"]).timestamp() for row in rows)
    first_batch_end, last = stamps[batch_size - 1], stamps[-1]
    return {"images": len(rows), "wall_s": round(wall, 2),
            "images_per_s": round((len(rows) - batch_size) / (last - first_batch_end), 4),
            "s_per_batch": round((last - first_batch_end) / ((len(rows) - batch_size) / batch_size), 4),
            "first_row_s": round(stamps[0] - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "fast"], choices=sorted(IMAGES))
    parser.add_argument("--out", default="benchmarks/results/ray.json")
    args = parser.parse_args()

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the local instance on 127.0.0.1 only
    import ray

    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        root = generate(Path(folder) / "synthetic", SyntheticSpec(categories=("disc",), image_size=256),
                        progress=False)
        for preset in args.presets:
            count, batch = IMAGES[preset]
            model = make_model(preset, root / "disc" / "train" / "good", Path(folder) / f"{preset}.cfm")
            photos = images(root, count, Path(folder) / f"photos-{preset}")
            common = [clipfusion_command(), "predict", str(photos), "--model", str(model), "--batch-size", str(batch),
                      "--quiet"]
            result = {"preset": preset, "batch_size": batch}
            for engine, extra in (("local", []), ("ray", ["--engine", "ray", "--ray-address", address,
                                                         "--cpus-per-worker", "2"])):
                out = Path(folder) / f"out-{preset}-{engine}"
                result[engine] = timed_run([*common, "--out", str(out), *extra], out, batch)
                print(json.dumps({preset: {engine: result[engine]}}), flush=True)
            local, remote = result["local"], result["ray"]
            result["ray_vs_local"] = round(remote["images_per_s"] / local["images_per_s"], 3)
            result["overhead_ms_per_batch"] = round(1000 * (remote["s_per_batch"] - local["s_per_batch"]), 1)
            result["extra_start_s"] = round(remote["first_row_s"] - local["first_row_s"], 2)
            runs.append(result)
    ray.shutdown()
    note = ("fast: full-size architectures with random weights (speed does not depend on weights); 256x256 PNGs; "
            "local Ray instance with one actor (2 CPUs, torch on 2 threads) and decoding tasks (1 CPU), on a "
            "2-core machine: Ray's CPUs are scheduling tokens, the cores are shared as in the local engine")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "machine": machine_info(RuntimeConfig()), "note": note},
                                         indent=2) + "\n")
    lines = ["| preset | batch | local images/s | Ray images/s | Ray / local | overhead ms/batch | extra start-up s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['batch_size']} | {r['local']['images_per_s']} | {r['ray']['images_per_s']} | "
              f"{r['ray_vs_local']} | {r['overhead_ms_per_batch']} | {r['extra_start_s']} |" for r in runs]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
