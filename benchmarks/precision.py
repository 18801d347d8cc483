"""What bfloat16 costs in fidelity: maps, scores and decisions of each preset in bf16 against float32
on the synthetic set (same images, same references, same process).

With random weights (tiny; fast as full-size random architectures) this measures numerical agreement
only, not accuracy.  On CPUs without native bf16 the bf16 pass is emulated and slow: use few images.
Usage: python benchmarks/precision.py [--presets tiny fast] [--images 8] [--out benchmarks/results/precision.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from clipfusion.config import RuntimeConfig
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.tasks.benchmark import machine_info, random_weight_preset


def detector(preset: str, dtype: str) -> CLIPFusion:
    """tiny as it is; other presets as full-size architectures with random weights."""
    runtime = RuntimeConfig("cpu", dtype)
    if preset == "tiny":
        return CLIPFusion("tiny", runtime, batch_size=4)
    return CLIPFusion(random_weight_preset(preset), runtime, batch_size=4)


def compare(preset: str, references: list[Path], normals: list[Path], tests: list[Path]) -> dict[str, object]:
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        model = detector(preset, dtype).fit(references, "disc")
        start = time.perf_counter()
        model.calibrate(normals, "disc")
        prediction = model.predict(tests, "disc")
        outputs[dtype] = (prediction, model.thresholds_, time.perf_counter() - start)
    full, low = outputs["float32"][0], outputs["bfloat16"][0]
    span = float(full.maps.max() - full.maps.min()) or 1.0
    difference = np.abs(full.maps - low.maps) / span
    threshold = outputs["float32"][1].image
    return {
        "preset": preset, "images": len(tests),
        "map_max_abs_diff_of_range": round(float(difference.max()), 5),
        "map_mean_abs_diff_of_range": round(float(difference.mean()), 6),
        "map_pearson_r": round(float(np.corrcoef(full.maps.ravel(), low.maps.ravel())[0, 1]), 6),
        "score_max_abs_diff": round(float(np.abs(full.scores - low.scores).max()), 6),
        "decision_agreement_at_fp32_threshold": round(float(np.mean((full.scores > threshold)
                                                                     == (low.scores > threshold))), 4),
        "seconds": {dtype: round(outputs[dtype][2], 1) for dtype in outputs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "fast"])
    parser.add_argument("--images", type=int, default=8, help="test images (and as many held-out normals)")
    parser.add_argument("--out", default="benchmarks/results/precision.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        spec = SyntheticSpec(categories=("disc",), image_size=256, n_train=2 + args.images, seed=0)
        root = generate(folder, spec, progress=False)
        normal = sorted((root / "disc" / "train" / "good").iterdir())
        tests = sorted((root / "disc" / "test").rglob("*.png"))[:args.images]
        runs = []
        for preset in args.presets:
            run = compare(preset, normal[:2], normal[2:], tests)
            print(json.dumps(run), flush=True)
            runs.append(run)
    result = {"runs": runs, "machine": machine_info(RuntimeConfig()),
              "note": "random weights: numerical agreement of bf16 with float32, not accuracy; 2-shot, "
                      "thresholds from held-out normals"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
