"""CPU cost per image of the stages around the model in ``predict``: decoding (PNG and JPEG), deciding
(the map at the image's size, thresholds, regions: ``Inspector``), rendering (overlay, mask, thumbnail,
raw map) and the driver's writing of the files, at 256, 1024 and
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
from clipfusion.images import Images
from clipfusion.inspection import Decisions, Inspector
from clipfusion.inspection.sources import Decoded, read_sources
from clipfusion.inspection.writer import ImageWriter, render
from clipfusion.protocol import Prediction
from clipfusion.tasks.benchmark import machine_info

SIDES = (256, 1024, 2048)
REPEATS = 5


def _scene(side: int, seed: int) -> np.ndarray:
    """A textured RGB image (compresses like a photo, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((side, side, 3)), (2, 2, 0))
    return (255 * (noise - noise.min()) / np.ptp(noise)).astype(np.uint8)


class FixedMap:
    """A detector that gives every image the same score and (256, 256) map: the model pass costs nothing."""

    def __init__(self, raw_map: np.ndarray) -> None:
        self.raw_map = raw_map

    def predict(self, images: Images, category: str | None = None) -> Prediction:
        count = len(images) if isinstance(images, list) else 1
        return Prediction(np.full(count, 0.7, np.float32), np.repeat(self.raw_map[None], count, axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/stages.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    thresholds = Thresholds(image=0.5, pixel=0.6, rule="fixed for the benchmark", n_normals=1, normal_min=0.2,
                            normal_max=0.5, normal_mean=0.4, normal_std=0.05, pixel_median=0.3)
    decisions = Decisions(0.5, 0.6, "fixed", thresholds.colour_scale, thresholds)
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
            inspector = Inspector(FixedMap(raw_map.astype(np.float32)), decisions, "disc", None, 16, 10**9)
            decoded = [Decoded("x.png", image)]
            (inspection,) = inspector.inspect_decoded(decoded)
            rendered = render(inspection, decisions)
            writer = ImageWriter(Path(folder) / f"out-{side}")
            names = iter(range(10**6))
            row = {"side": side,
                   "decode_png_ms": median_ms(lambda p=files["png"]: read_sources([p], 10**9), REPEATS),
                   "decode_jpeg_ms": median_ms(lambda p=files["jpeg"]: read_sources([p], 10**9), REPEATS),
                   "decide_ms": median_ms(lambda d=decoded, i=inspector: i.inspect_decoded(d), REPEATS),
                   "render_ms": median_ms(lambda s=inspection: render(s, decisions), REPEATS),
                   "write_ms": median_ms(lambda r=rendered, w=writer, n=names: w.write(f"{next(n):06d}", r), REPEATS),
                   "files_kb": round(sum(len(data) for data in rendered.files.values()) / 1024)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    note = ("one thread; median of 5 after a warm-up; a textured RGB image, JPEG quality 90; decide = the map "
            "resized to the image, thresholds and regions; render = annotated overlay PNG, mask PNG, thumbnail JPEG "
            "and raw-map .npy of one NG image; write = the driver "
            "writing them atomically to local disk")
    Path(args.out).write_text(json.dumps({"runs": rows, "machine": machine_info(RuntimeConfig()), "note": note},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
