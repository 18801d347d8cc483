"""Memory in flight per pixel while one image is inspected, as the service does it: ``Inspector`` (the
map at the image's size, thresholds, regions) then ``render`` (overlay, mask, map, thumbnail), the peak
of Python's traced allocations (NumPy's included) above what was held before, per pixel of the image,
at several sizes.  It sets what ``serve --pixel-budget`` costs in memory (docs/service.md).  The model is
the tiny preset: the detector's own activations do not grow with the image (it resizes to its input).
Usage: python benchmarks/serve_memory.py [--out benchmarks/results/serve_memory.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
from _common import make_model

from clipfusion.config import RuntimeConfig
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.inspection import Inspector
from clipfusion.inspection.sources import Decoded
from clipfusion.inspection.writer import render
from clipfusion.tasks.benchmark import machine_info

SIDES = (512, 1024, 2048, 4096, 6000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/serve_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = generate(Path(folder) / "data", SyntheticSpec(categories=("disc",), image_size=96, n_train=4,
                                                             n_test_good=1, n_test_per_defect=1), progress=False)
        model = make_model("tiny", data / "disc" / "train" / "good", Path(folder) / "disc.cfm")
        inspector = Inspector.from_model(model, RuntimeConfig("cpu", "float32"))
        inspector.inspect_decoded([Decoded("warm-up", np.full((64, 64, 3), 128, np.uint8))])
        rows = []
        for side in SIDES:
            rng = np.random.default_rng(side)
            image = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            tracemalloc.start()
            (inspection,) = inspector.inspect_decoded([Decoded("x", image)])
            inspected = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            render(inspection, inspector.decisions)
            rendered = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            pixels = side * side
            row = {"side": side, "megapixels": round(pixels / 1e6, 2),
                   "inspect_peak_bytes_per_pixel": round(inspected / pixels, 1),
                   "render_peak_bytes_per_pixel": round(rendered / pixels, 1),
                   "peak_mb": round(max(inspected, rendered) / 2**20), "image_mb": round(pixels * 3 / 2**20)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    note = ("tracemalloc peaks above the memory held before each image (the image itself, 3 B a pixel, not "
            "included); render's peak includes the inspection it renders (map, mask, regions at the image's size)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": rows, "machine": machine_info(RuntimeConfig()), "note": note},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
