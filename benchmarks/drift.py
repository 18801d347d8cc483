"""Score-drift alarms measured: false alarms over a long run of unshifted normal images, and how many
images a simulated drift takes to raise the alarm (issue 29, item 3).

A model is fitted (``--shots`` references, thresholds from ``--held-out`` normal images) on the synthetic
generator's normal parts; ``--normals`` other normal parts (another seed) are scored once, and the same
parts again under three drifts of the camera: brightness -20 %, a Gaussian blur of 2 px, and the picture
shifted by 5 % of its width.  The monitor (``clipfusion.inspection.drift``, the one serve and watch run) is
then replayed over those scores for each setting of the grid: false alarms and bad windows on the unshifted
run, images until the alarm on each drift.  Random weights: mechanics, not accuracy.

    python benchmarks/drift.py                       # tiny, 5,000 normals → benchmarks/results/drift.json
    python benchmarks/drift.py --preset fast --normals 600 --drifted 200 --out benchmarks/results/drift-fast.json
    (fast: full-size architectures with random weights)
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import RANDOM_FAST, clipfusion_command
from PIL import Image, ImageFilter

from clipfusion.data import read_rgb
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.hardware import cpu_info
from clipfusion.inspection import ModelFile
from clipfusion.inspection.drift import ALARM, DriftMonitor, DriftSettings
from clipfusion.methods.clipfusion.detector import CLIPFusion

GRID = [DriftSettings(window=w, alarm_after=k) for w in (100, 200, 400) for k in (2, 3)]


def brightness(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) * 0.8).round().astype(np.uint8)


def blur(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(2)))


def shift(image: np.ndarray) -> np.ndarray:
    """The camera moved by 5 % of the width: the picture shifted right and down, the edge repeated."""
    step = max(1, round(0.05 * image.shape[1]))
    padded = np.pad(image, ((step, 0), (step, 0), (0, 0)), mode="edge")
    return padded[:image.shape[0], :image.shape[1]]


DRIFTS = {"brightness -20%": brightness, "blur 2 px": blur, "shift 5%": shift}


def replay(scores: np.ndarray, reference: list[float], threshold: float, settings: DriftSettings) -> dict:
    """The monitor over ``scores`` in order: alarms raised, bad windows, images until the first alarm."""
    monitor = DriftMonitor(reference, threshold, settings)
    alarms, first, raised = 0, None, False
    for seen, score in enumerate(scores, 1):
        if monitor.observe(float(score)) is None:
            continue
        alarm = monitor.state().state == ALARM
        if alarm and not raised:
            alarms += 1
            first = first or seen
        raised = alarm
    return {"windows": monitor.windows, "bad_windows": monitor.bad_windows, "alarms": alarms,
            "images_until_alarm": first}


def score_all(detector: CLIPFusion, paths: list[Path], change: Callable[[np.ndarray], np.ndarray] | None = None,
              batch: int = 32) -> np.ndarray:
    scores = []
    for start in range(0, len(paths), batch):
        images = [read_rgb(p) for p in paths[start:start + batch]]
        scores.append(detector.predict([change(i) if change else i for i in images], "disc").scores)
    return np.concatenate(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=96, help="image side of the synthetic parts")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=50, help="normal images the thresholds come from")
    parser.add_argument("--normals", type=int, default=5000, help="unshifted normal images scored")
    parser.add_argument("--drifted", type=int, default=1000, help="images scored under each drift")
    parser.add_argument("--out", default="benchmarks/results/drift.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        fit_root = generate(Path(folder) / "fit", SyntheticSpec(categories=("disc",), image_size=args.size,
                                                               n_train=args.shots + args.held_out, n_test_good=1,
                                                               n_test_per_defect=1, seed=11), progress=False)
        line_root = generate(Path(folder) / "line", SyntheticSpec(categories=("disc",), image_size=args.size,
                                                                 n_train=args.normals, n_test_good=1,
                                                                 n_test_per_defect=1, seed=12), progress=False)
        model = Path(folder) / "disc.cfm"
        random_weights = RANDOM_FAST if args.preset == "fast" else []  # full size, no weights to download
        subprocess.run([clipfusion_command(), "fit", "--normal", str(fit_root / "disc/train/good"), "--category",
                        "disc", "--shots", str(args.shots), "--preset", args.preset, *random_weights, "--out",
                        str(model), "--quiet"], check=True)
        detector = CLIPFusion.load(model, batch_size=32)
        opened = ModelFile.open(model)
        assert opened.fingerprint is not None
        reference = [normal.score for normal in opened.fingerprint.normals]
        threshold = detector.thresholds_.image
        paths = sorted((line_root / "disc/train/good").glob("*.png"))
        unshifted = score_all(detector, paths)
        drifted = {name: score_all(detector, paths[:args.drifted], change) for name, change in DRIFTS.items()}
        seconds = time.perf_counter() - started

    margin = DriftMonitor(reference, threshold).margin
    results = []
    for settings in GRID:
        results.append({"window": settings.window, "alarm_after": settings.alarm_after, "alpha": settings.alpha,
                        "min_shift": settings.min_shift,
                        "unshifted": replay(unshifted, reference, threshold, settings),
                        "drifts": {name: replay(s, reference, threshold, settings) for name, s in drifted.items()}})
    cpu = cpu_info()
    summary = {
        "preset": args.preset, "image_size": args.size, "held_out_normals": len(reference),
        "threshold": threshold, "margin": margin, "normals": len(unshifted), "drifted_each": args.drifted,
        "ng_rate_unshifted": float(np.mean(unshifted > threshold)),
        "score_median": {"reference": float(np.median(reference)), "unshifted": float(np.median(unshifted)),
                         **{name: float(np.median(s)) for name, s in drifted.items()}},
        "ng_rate": {name: float(np.mean(s > threshold)) for name, s in drifted.items()},
        "grid": results, "seconds": round(seconds, 1),
        "machine": {"cpu": cpu.model, "cpu_flags": list(cpu.flags), "python": platform.python_version(),
                    "dtype": str(detector.precision)},
        "note": "random weights: the alarm's mechanics and rates on synthetic parts, not accuracy on a real line",
    }
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    for row in results:
        until = {name: d["images_until_alarm"] for name, d in row["drifts"].items()}
        print(f"window {row['window']:4d} after {row['alarm_after']}: unshifted {row['unshifted']['alarms']} alarms "
              f"({row['unshifted']['bad_windows']}/{row['unshifted']['windows']} bad windows); until alarm {until}")


if __name__ == "__main__":
    main()
