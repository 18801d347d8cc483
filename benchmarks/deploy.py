"""Footprint of a deployment: the full install against the torch-free runtime of an exported model.

Measures, on this machine: the size of .venv (full install, `scripts/setup.sh`) and .venv-runtime
(`pip install -e '.[runtime]'`, `scripts/runtime-venv.sh`); the size of the `fast` model file and of
its OpenVINO export; and the cold start of each, `clipfusion predict ONE_IMAGE` in a new process, from
the command to the first result written (interpreter start, imports, model load, one image), median
of --repeats runs.  `fast` with random weights of the full-size architectures (nothing downloaded).
Usage: python benchmarks/deploy.py [--out benchmarks/results/deploy.json] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import clipfusion_command, make_model

from clipfusion.hardware import cpu_info

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / ".venv-runtime" / "bin" / "clipfusion"


def _size_mb(path: Path) -> float:
    output = subprocess.run(["du", "-sk", str(path)], check=True, capture_output=True, text=True).stdout
    return round(int(output.split()[0]) / 1024, 1)


def _cold_start(command: list[str], out: Path, repeats: int) -> float:
    """Median seconds of ``command --out DIR`` in a fresh process, one new output folder per run."""
    times = []
    for run in range(repeats):
        start = time.perf_counter()
        subprocess.run([*command, "--out", str(out / f"run{run}"), "--quiet"], check=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/deploy.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpu = cpu_info()
    if not RUNTIME.exists():
        raise SystemExit("build .venv-runtime first: bash scripts/runtime-venv.sh")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        subprocess.run([clipfusion_command(), "synth", "--out", str(work / "data"), "--quiet"], check=True)
        normal = work / "data" / "disc" / "train" / "good"
        model = make_model("fast", normal, work / "fast.cfm")
        export = work / "fast-ov"
        start = time.perf_counter()
        subprocess.run([clipfusion_command(), "export", "--model", str(model), "--out", str(export), "--quiet"],
                       check=True)
        export_seconds = time.perf_counter() - start
        image = str(next((work / "data" / "disc" / "test" / "good").iterdir()))
        full = _cold_start([clipfusion_command(), "predict", image, "--model", str(model), "--device", "cpu",
                            "--dtype", "float32"], work / "full", args.repeats)
        runtime = _cold_start([str(RUNTIME), "predict", image, "--model", str(export)], work / "runtime",
                              args.repeats)
        result = {
            "venv_mb": {"full (.venv: models, export, serve, ray, dev extras)": _size_mb(ROOT / ".venv"),
                        "runtime (.venv-runtime: clipfusion[runtime])": _size_mb(ROOT / ".venv-runtime")},
            "model_mb": {"fast.cfm (zero-shot; weights in the Hugging Face cache)": _size_mb(model),
                         "fast OpenVINO export (weights included)": _size_mb(export)},
            "export_seconds": round(export_seconds, 1),
            "cold_start_seconds": {"full install, fast.cfm": full, "runtime, fast export": runtime},
            "repeats": args.repeats,
            "machine": {"cpu": cpu.model, "cpus": cpu.cores, "cpu_flags": list(cpu.flags)},
        }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
