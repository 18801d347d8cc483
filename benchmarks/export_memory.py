"""Peak memory of ``clipfusion export`` on its own: one fresh process per (preset, weights), each building
a zero-shot detector with random weights and exporting it (OpenVINO IR; int8 with its check on the
probe images), the process's peak RSS and wall time taken by the parent (``os.wait4``).

Usage: python benchmarks/export_memory.py [--presets paper-recon fast] [--weights float32 int8]
                                          [--out benchmarks/results/export_memory.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(preset: str, weights: str, out: str) -> None:
    """In a fresh process: the zero-shot export of ``preset`` (random weights) into ``out``."""
    from clipfusion.config import RuntimeConfig
    from clipfusion.export.writer import export_detector
    from clipfusion.methods.clipfusion.detector import CLIPFusion
    from clipfusion.tasks.benchmark import _peak_rss_mb, random_weight_preset

    detector = CLIPFusion(random_weight_preset(preset), RuntimeConfig("cpu", "float32"), batch_size=1)
    export_detector(detector, "object", Path(out), weights=weights, release_models=True)  # as clipfusion export
    print(json.dumps({"peak_rss_mb": round(_peak_rss_mb())}))  # VmHWM: ru_maxrss keeps the parent's peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["paper-recon", "fast"])
    parser.add_argument("--weights", nargs="+", default=["float32", "int8"], choices=("float32", "int8"))
    parser.add_argument("--out", default="benchmarks/results/export_memory.json")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(*args.one)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_results

    runs = []
    for preset in args.presets:
        for weights in args.weights:
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--one", preset, weights, str(Path(folder) / "x")],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{preset} {weights}: the export failed: {done.stderr[-2000:]}")
                size = sum(path.stat().st_size for path in (Path(folder) / "x").iterdir())
                row = {"preset": preset, "weights": weights, **json.loads(done.stdout.strip().splitlines()[-1]),
                       "seconds": round(time.perf_counter() - start), "export_mb": round(size / 1e6)}
                print(json.dumps(row), flush=True)
                runs.append(row)
    write_results(args.out, runs, command=" ".join(["python", "benchmarks/export_memory.py", *sys.argv[1:]]),
                  note="zero-shot exports of random-weight models, the int8 one checked on the three probe images")


if __name__ == "__main__":
    main()
