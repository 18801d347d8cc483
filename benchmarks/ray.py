"""Throughput of ``predict --engine ray`` against the local engine, in one run on this machine, and the
Ray engine's overhead per batch.

Both engines score the same synthetic images with the same model file (``fast``: full-size
architectures with random weights; ``tiny``: where a batch costs milliseconds, so the overhead
shows).  Each engine runs twice, on one batch and on several: the difference of the two wall times
is the steady cost of the extra batches, so start-up (Ray, actor, model loading) cancels out; it is
reported apart as the one-batch run's wall time.  (The rows' timestamps cannot serve: the Ray
engine's driver writes rows as results arrive, not as batches finish.)

The Ray instance is local: one scoring actor holding 2 CPUs (torch then runs 2 threads, as the local
engine does here) and the decoding and rendering tasks (half a CPU each).  Ray's CPUs are scheduling
tokens, so it is declared with 3 on this 2-core machine, where all stages share the cores as they do
in the local engine.
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
from pathlib import Path

from _common import clipfusion_command, make_model

# This file is called ray.py: its folder, first on the path of a script, must not shadow the ray package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from clipfusion.config import RuntimeConfig  # noqa: E402
from clipfusion.data.synthetic import SyntheticSpec, generate  # noqa: E402
from clipfusion.tasks.benchmark import machine_info  # noqa: E402

# images of the long run and batch size per preset (the short run is one batch)
IMAGES = {"tiny": (96, 8), "fast": (24, 8)}


def images(root: Path, count: int, folder: Path) -> Path:
    """``count`` test images (the synthetic test set repeated under distinct names)."""
    sources = sorted((root / "disc" / "test").rglob("*.png"))
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"{index:04d}.png").write_bytes(sources[index % len(sources)].read_bytes())
    return folder


def timed_run(command: list[str], out: Path) -> float:
    """Run ``command`` (writing to ``out``); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([*command, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    assert len((out / "results.jsonl").read_text().splitlines()) > 0
    return seconds


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
            short = images(root, batch, Path(folder) / f"short-{preset}")
            long = images(root, count, Path(folder) / f"long-{preset}")
            result: dict = {"preset": preset, "batch_size": batch, "images": count}
            for engine, extra in (("local", []), ("ray", ["--engine", "ray", "--ray-address", address,
                                                         "--cpus-per-worker", "2"])):
                common = [clipfusion_command(), "predict", "--model", str(model), "--batch-size", str(batch),
                          "--quiet", *extra]
                one = timed_run([*common, str(short)], Path(folder) / f"out-{preset}-{engine}-short")
                many = timed_run([*common, str(long)], Path(folder) / f"out-{preset}-{engine}-long")
                steady = (many - one) / (count - batch)  # seconds per image once running
                result[engine] = {"one_batch_wall_s": round(one, 2), "wall_s": round(many, 2),
                                  "images_per_s": round(1 / steady, 4), "s_per_batch": round(steady * batch, 3)}
                print(json.dumps({preset: {engine: result[engine]}}), flush=True)
            local, remote = result["local"], result["ray"]
            result["ray_vs_local"] = round(remote["images_per_s"] / local["images_per_s"], 3)
            result["overhead_ms_per_batch"] = round(1000 * (remote["s_per_batch"] - local["s_per_batch"]), 1)
            result["extra_start_s"] = round(remote["one_batch_wall_s"] - local["one_batch_wall_s"], 2)
            runs.append(result)
    ray.shutdown()
    note = ("fast: full-size architectures with random weights (speed does not depend on weights); 256x256 PNGs; "
            "local Ray instance with one actor (2 CPUs, torch on 2 threads) and decoding and rendering tasks "
            "(half a CPU each), on a 2-core machine: Ray's CPUs are scheduling tokens, the cores are shared as "
            "in the local engine; steady cost = wall(N images) - wall(one batch)")
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
