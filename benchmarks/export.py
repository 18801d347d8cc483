"""The exported runtime against PyTorch eager: `clipfusion benchmark` with the OpenVINO rows, per preset
and shots, each pair (PyTorch row, its export's rows) measured side by side in one run.

One `clipfusion benchmark` process per (preset, shots): a full-size export holds its own copy of the
weights, so keeping every export of both presets loaded at once needs more than this machine's 24 GB.
Usage: python benchmarks/export.py [--out benchmarks/results] [--images 2] [--no-int8]
Writes export.json (every run, merged) and export.md (run it alone: other load distorts the timings).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import clipfusion_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["fast", "paper-recon"])
    parser.add_argument("--no-int8", action="store_true", help="skip the 8-bit-weight rows")
    args = parser.parse_args()
    methods = ["clipfusion", "clipfusion-openvino"] + ([] if args.no_int8 else ["clipfusion-openvino-int8"])
    merged: dict = {"runs": [], "ratios": {}, "agreement": {}, "build_and_warmup_seconds": {}}
    markdown = ["# clipfusion benchmark: exported runtime (OpenVINO) against PyTorch eager", ""]
    for preset in args.presets:
        for shots in (0, 4):
            with tempfile.TemporaryDirectory() as folder:
                command = [clipfusion_command(), "benchmark", "--methods", *methods, "--presets", preset,
                           "--shots", str(shots), "--batch-size", "1", "--images", str(args.images),
                           "--repeats", "2", "--no-naive", "--device", "cpu", "--dtype", "float32",
                           "--out", folder, "--quiet"]  # exports are traced from float32 models
                print(" ".join(command), flush=True)
                subprocess.run(command, check=True)
                result = json.loads((Path(folder) / "benchmark.json").read_text())
                markdown += [f"## {preset}, {shots}-shot", "",
                             (Path(folder) / "benchmark.md").read_text().split("\n", 2)[2], ""]
            merged["runs"] += result["runs"]
            merged["ratios"].update(result["ratios"])
            merged["agreement"].update(result["agreement"])
            merged["build_and_warmup_seconds"][f"{preset}_{shots}shot"] = result["build_and_warmup_seconds"]
            merged["machine"], merged["spec"] = result["machine"], {**result["spec"], "shots": [0, 4],
                                                                      "presets": args.presets}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "export.json").write_text(json.dumps(merged, indent=2) + "\n")
    (Path(args.out) / "export.md").write_text("\n".join(markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
