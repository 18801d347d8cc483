"""Small-image latency beside a stream of 30-megapixel images, for two versions of the service in one
run on this machine: the source tree given with ``--before-src`` (e.g. a ``git worktree`` of an earlier
commit) and this one.  Three clients post 256x256 PNGs while a fourth posts a 30-megapixel image after
another; one replica, the tiny preset.

Usage: git worktree add /tmp/before d83c557
       python benchmarks/serve_before_after.py --before-src /tmp/before/src --label d83c557
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from functools import partial
from pathlib import Path

import serve as bench
from _common import make_model

from clipfusion.config import RuntimeConfig
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.tasks.benchmark import machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-src", required=True, help="the earlier version's src folder")
    parser.add_argument("--label", default="before", help="what to call the earlier version")
    parser.add_argument("--out", default="benchmarks/results/serve_before_after.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        root = generate(Path(folder) / "data", SyntheticSpec(categories=("disc",), image_size=256, n_train=3),
                        progress=False)
        small = sorted((root / "disc" / "test" / "good").iterdir())[0].read_bytes()
        (Path(folder) / "tiny").mkdir()
        model = make_model("tiny", root / "disc" / "train" / "good", Path(folder) / "tiny" / "model.cfm")
        large = bench.flat_png(30_000_000)
        for label, source in ((args.label, str(Path(args.before_src).resolve())), ("this tree", None)):
            os.environ.pop("PYTHONPATH", None)  # the service subprocess imports the version asked for
            if source is not None:
                os.environ["PYTHONPATH"] = source
            process, url = bench.serve(model, Path(folder) / f"mixed-{len(runs)}", 8)
            try:
                bench.load(url, small, 2, 4)
                alone = bench.load(url, small, 3, 90)
                result, mixed = bench.beside(url, small, 3, partial(bench.large_stream, url, large))
                runs.append({"version": label, "replicas": 1, **result, "small_p95_ms_alone": alone["p95_ms"],
                             "small_p95_ms_mixed": mixed["p95_ms"], "small_images_per_s_alone": alone["images_per_s"],
                             "small_images_per_s_mixed": mixed["images_per_s"]})
                print(json.dumps(runs[-1]), flush=True)
            finally:
                bench.stop(process)
    Path(args.out).write_text(json.dumps({"runs": runs, "machine": machine_info(RuntimeConfig())}, indent=2) + "\n")


if __name__ == "__main__":
    main()
