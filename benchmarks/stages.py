"""CPU cost per image of the stages around the model in ``predict``: decoding (PNG and JPEG), rendering
(regions, overlay, mask, thumbnail, raw map) and the driver's writing of the files, at 256, 1024 and
2048 px, on one thread.  These set how many CPUs a scoring GPU needs beside it, and how many images
per second one driver can write (docs/scale.md).
Usage: python benchmarks/stages.py [--out benchmarks/results/stages.json]
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import median_ms
from PIL import Image
from scipy import ndimage

from clipfusion.config import RuntimeConfig
from clipfusion.decisions import Thresholds
from clipfusion.tasks.benchmark import machine_info
from clipfusion.tasks.predict import ImageWriter, Rendered, RowSettings, Scored, decode_batch, render_batch
from clipfusion.tasks.thresholds import Decisions

SIDES = (256, 1024, 2048)
REPEATS = 5


def _scene(side: int, seed: int) -> np.ndarray:
    """A textured RGB image (compresses like a photo, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((side, side, 3)), (2, 2, 0))
    return (255 * (noise - noise.min()) / np.ptp(noise)).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/stages.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    thresholds = Thresholds(image=0.5, pixel=0.6, rule="fixed for the benchmark", n_normals=1, normal_min=0.2,
                            normal_max=0.5, normal_mean=0.4, normal_std=0.05, pixel_median=0.3)
    decisions = Decisions(0.5, 0.6, "fixed", thresholds.colour_scale, thresholds)
    settings = RowSettings("disc", decisions, None, 16, 10**9)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for side in SIDES:
            image = _scene(side, side)
            files = {}
            for kind, suffix in (("png", ".png"), ("jpeg", ".jpg")):
                path = Path(folder) / f"{side}{suffix}"
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format=kind.upper(), **({"quality": 90} if kind == "jpeg" else {}))
                path.write_bytes(buffer.getvalue())
                files[kind] = str(path)
            raw_map = ndimage.gaussian_filter(np.random.default_rng(0).random((256, 256)), 8).astype(np.float32)
            raw_map = 0.3 + 0.5 * (raw_map - raw_map.min()) / np.ptp(raw_map)  # NG, with regions above 0.6
            scored = [Scored("x.png", image, 0.7, raw_map, 0.0)]
            rendered = render_batch(scored, settings)[0]
            assert isinstance(rendered, Rendered)
            writer = ImageWriter(Path(folder) / f"out-{side}", settings)
            names = iter(range(10**6))
            row = {"side": side,
                   "decode_png_ms": median_ms(lambda p=files["png"]: decode_batch([p], 10**9), REPEATS),
                   "decode_jpeg_ms": median_ms(lambda p=files["jpeg"]: decode_batch([p], 10**9), REPEATS),
                   "render_ms": median_ms(lambda s=scored: render_batch(s, settings), REPEATS),
                   "write_ms": median_ms(lambda r=rendered, w=writer, n=names: w.write(f"{next(n):06d}", r), REPEATS),
                   "files_kb": round(sum(len(data) for data in rendered.files.values()) / 1024)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    note = ("one thread; median of 5 after a warm-up; a textured RGB image, JPEG quality 90; render = regions, "
            "annotated overlay PNG, mask PNG, thumbnail JPEG and raw-map .npy of one NG image; write = the driver "
            "writing them atomically to local disk")
    Path(args.out).write_text(json.dumps({"runs": rows, "machine": machine_info(RuntimeConfig()), "note": note},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
