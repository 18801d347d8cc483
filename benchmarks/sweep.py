"""Cost of a fusion-level sweep against one evaluation: 9 values of α vs 1, same data, same process.

Fusion-level settings reuse the encoder outputs, so the 9-value sweep should cost barely more than one
evaluation.  Full-size random-weight models of the given preset (default fast), one synthetic category.
Usage: python benchmarks/sweep.py [--preset fast] [--out benchmarks/results/sweep.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from clipfusion.config import RuntimeConfig
from clipfusion.data import MVTecDataset
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.evaluation.sweep_units import SweepConfig
from clipfusion.tasks.benchmark import machine_info, random_weight_preset
from clipfusion.tasks.sweep import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--out", default="benchmarks/results/sweep.json")
    args = parser.parse_args()
    preset = random_weight_preset(args.preset)
    runtime = RuntimeConfig()
    overrides = {f"{group}__{key}": value for group in ("clip", "diffusion", "mapdiff")
                 for key, value in vars(getattr(preset, group)).items()}
    timings = {}
    with tempfile.TemporaryDirectory() as folder:
        dataset = MVTecDataset(generate(folder, SyntheticSpec(categories=("disc",)), progress=False))
        for label, alphas in (("warm-up", [0.5]), ("one evaluation", [0.5]),
                              ("9-value alpha sweep", [0.1 * i for i in range(1, 10)])):
            config = SweepConfig(preset=args.preset, categories=["disc"], shots=[0], seeds=[0],
                                 grid={"fusion__alpha_seg": alphas, "fusion__alpha_cls": [0.5]}, overrides=overrides)
            start = time.perf_counter()
            run_sweep(config, dataset, runtime, Path(folder) / "out", progress=False)
            timings[label] = round(time.perf_counter() - start, 2)
        n_images = len(dataset.test_samples("disc"))
    result = {"preset": f"{args.preset} (random weights)", "images": n_images, "seconds": timings,
              "ratio": round(timings["9-value alpha sweep"] / timings["one evaluation"], 3),
              "machine": machine_info(runtime)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
