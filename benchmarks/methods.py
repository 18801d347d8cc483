"""The committed CPU figures: `clipfusion benchmark` of CLIPFusion (eager and `--compile`) and WinCLIP,
written to benchmarks/results/ (both methods at the default dtype, `--dtype auto`).

Usage: python benchmarks/methods.py [--out benchmarks/results] [--name cpu] [extra `clipfusion benchmark` options]
e.g. the committed cpu.json and cpu.md (about 13 minutes on a 2-core CPU):
  python benchmarks/methods.py --name cpu --presets fast --shots 0 --batch-size 1 8 --images 8 --no-naive
Writes NAME.json and NAME.md (run it alone: other load on the machine distorts the timings).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from clipfusion.cli import main as clipfusion


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="cpu", help="file stem of the results (default: %(default)s)")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        code = clipfusion(["benchmark", "--methods", "clipfusion", "clipfusion-compiled", "winclip", "--presets",
                           "paper-recon", "fast", "--images", "4", "--out", folder, *extra])
        if code == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(folder) / "benchmark.json", Path(args.out) / f"{args.name}.json")
            shutil.copy(Path(folder) / "benchmark.md", Path(args.out) / f"{args.name}.md")
    return code


if __name__ == "__main__":
    sys.exit(main())
