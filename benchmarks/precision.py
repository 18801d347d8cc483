"""What bfloat16 costs in fidelity, and how far bfloat16 results move with the way images are run: per
preset, maps, scores, thresholds and decisions in bf16 against float32 (same images, same references,
same process), and in each precision the scores of the same images run one per call and on one thread
against the default batches and threads.  The largest score or threshold difference found is what
``hardware.BF16_SCORE_TOLERANCE`` must cover (docs/speed.md).

With random weights (tiny; the other presets as full-size random architectures) this measures numerical
agreement only, not accuracy.  On CPUs without native bf16 the bf16 pass is emulated and slow (and its
sums need not match a native CPU's to the last bit): use few images.
Usage: python benchmarks/precision.py [--presets tiny fast paper-recon] [--images 4]
                                      [--out benchmarks/results/precision.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipfusion.config import RuntimeConfig
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.hardware import BF16_SCORE_TOLERANCE
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.tasks.benchmark import machine_info, random_weight_preset

BATCH = 4


def detector(preset: str, dtype: str) -> CLIPFusion:
    """tiny as it is; other presets as full-size architectures with random weights."""
    runtime = RuntimeConfig("cpu", dtype)
    return CLIPFusion(preset if preset == "tiny" else random_weight_preset(preset), runtime, batch_size=BATCH)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(np.abs(a - b).max()), 6)


def how_runs_move(model: CLIPFusion, tests: list[Path]) -> dict[str, float]:
    """The same images scored one per call, and on one thread, against the default batches and threads:
    what separates the local engine, the service's dynamic batches and a one-CPU Ray worker."""
    batched = model.predict(tests, "disc").scores
    model.batch_size = 1
    alone = model.predict(tests, "disc").scores
    model.batch_size = BATCH
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = model.predict(tests, "disc").scores
    finally:
        torch.set_num_threads(threads)
    return {"one_per_call_vs_batches": _max_diff(alone, batched), "one_thread_vs_default": _max_diff(one_thread,
                                                                                                      batched)}


def compare(preset: str, references: list[Path], normals: list[Path], tests: list[Path]) -> dict[str, object]:
    outputs, moves = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = detector(preset, dtype).fit(references, "disc")
        start = time.perf_counter()
        model.calibrate(normals, "disc")
        prediction = model.predict(tests, "disc")
        outputs[dtype] = (prediction, model.thresholds_, time.perf_counter() - start)
        moves[dtype] = how_runs_move(model, tests)
    full, low = outputs["float32"][0], outputs["bfloat16"][0]
    full_thresholds, low_thresholds = outputs["float32"][1], outputs["bfloat16"][1]
    span = float(full.maps.max() - full.maps.min()) or 1.0
    difference = np.abs(full.maps - low.maps) / span
    threshold = full_thresholds.image
    return {
        "preset": preset, "images": len(tests), "held_out_normals": len(normals),
        "map_max_abs_diff_of_range": round(float(difference.max()), 5),
        "map_mean_abs_diff_of_range": round(float(difference.mean()), 6),
        "map_pearson_r": round(float(np.corrcoef(full.maps.ravel(), low.maps.ravel())[0, 1]), 6),
        "score_max_abs_diff": _max_diff(full.scores, low.scores),
        "image_threshold": {"float32": round(full_thresholds.image, 6), "bfloat16": round(low_thresholds.image, 6),
                            "abs_diff": round(abs(full_thresholds.image - low_thresholds.image), 6)},
        "pixel_threshold": {"float32": round(full_thresholds.pixel, 6), "bfloat16": round(low_thresholds.pixel, 6),
                            "abs_diff": round(abs(full_thresholds.pixel - low_thresholds.pixel), 6)},
        "decision_agreement_at_fp32_threshold": round(float(np.mean((full.scores > threshold)
                                                                     == (low.scores > threshold))), 4),
        "score_moves_with_how_images_run": moves,
        "seconds": {dtype: round(outputs[dtype][2], 1) for dtype in outputs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "fast", "paper-recon"])
    parser.add_argument("--images", type=int, default=4, help="test images (and as many held-out normals)")
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
    largest = max(max(run["score_max_abs_diff"], run["image_threshold"]["abs_diff"],
                      *run["score_moves_with_how_images_run"]["bfloat16"].values()) for run in runs)
    result = {"runs": runs, "machine": machine_info(RuntimeConfig("cpu", "float32")),
              "largest_bf16_score_or_threshold_difference": largest, "tolerance": BF16_SCORE_TOLERANCE,
              "note": "random weights: numerical agreement of bf16 with float32, and of bf16 runs batched or "
                      "threaded otherwise, not accuracy; 2-shot, thresholds from held-out normals"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"largest bf16 score or threshold difference {largest:g} (tolerance {BF16_SCORE_TOLERANCE:g})")


if __name__ == "__main__":
    main()
