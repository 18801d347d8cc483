"""Render docs/images/overview.png: synthetic defects, their masks, and CLIPFusion's 1-shot maps.

Run with the tiny preset (default) it illustrates the pipeline only: the models are untrained.
Usage: python scripts/make_readme_figure.py [--preset tiny] [--out docs/images/overview.png]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipfusion.data import MVTecDataset, read_rgb
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.overlays import overlay

PICKS = [("disc", "hole"), ("plate", "scratch"), ("fabric", "stain"), ("capsule", "crack")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", default="docs/images/overview.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = generate(folder, SyntheticSpec(image_size=192, n_train=3, n_test_good=1, n_test_per_defect=1),
                        progress=False)
        dataset = MVTecDataset(root)
        results = []
        for category, defect in PICKS:
            sample = next(s for s in dataset.test_samples(category) if s.defect == defect).load()
            detector = CLIPFusion(args.preset).fit([read_rgb(dataset.train_images(category)[0])], category)
            results.append((sample, detector.predict([sample.image], category).maps[0]))
    low = min(float(m.min()) for _, m in results)  # one colour scale for the whole figure
    high = max(float(m.max()) for _, m in results)
    columns = []
    for sample, amap in results:
        mask = np.repeat(sample.mask[:, :, None].astype(np.uint8) * 255, 3, axis=2)
        columns.append(np.concatenate([sample.image, mask, overlay(sample.image, amap, low, high, sample.mask)]))
    grid = np.concatenate([np.pad(c, ((0, 0), (4, 4), (0, 0)), constant_values=255) for c in columns], axis=1)
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 28), "white")
    canvas.paste(Image.fromarray(grid), (0, 28))
    ImageDraw.Draw(canvas).text(
        (6, 8), f"rows: image / ground truth / CLIPFusion 1-shot map (preset '{args.preset}'"
        + (": untrained random models, pipeline only)" if args.preset == "tiny" else ")"), fill="black")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
