"""Cold start (process start → first verdict) and steady speed: eager, ``--compile`` and the precompiled
parts (``clipfusion compile`` / ``--precompiled``), for one model file.

Each start is its own process (``--one MODE``), as a user's ``predict``/``serve`` start is: it loads the
model file, scores one image, then scores it ``--repeats`` more times; the parent takes the wall time
from launching it to its first verdict, and the child reports its peak RSS.  In order:

- ``eager-first``: no compiling (``--precompiled off``), the first run on a machine: the text embeddings'
  cache (``CLIPFUSION_TEXT_CACHE``) emptied first;
- ``eager``: the same, a later start (the text embeddings read from that cache);
- ``self-checked``: ``eager`` with the self-check that ``serve`` and ``watch`` run before their first verdict
  by default (``--self-check refuse``: the digest of every weight, the three probe images scored);
- ``compile-cold`` and ``compile-warm``: ``--compile`` with inductor's on-disk caches in a fresh folder,
  then again with that folder filled (``TORCHINDUCTOR_CACHE_DIR``: what a restarted service gets);
- ``precompiled-build``: ``--precompiled build`` on an empty package cache (the one-off compile);
- ``precompiled``: ``--precompiled auto`` with the packages built (every later start).

The steady figures of the separate processes are not interleaved, so the script ends with one process
(``--steady``) that runs the eager and the precompiled detector in turn on the same image, median of
``--rounds`` rounds, and the maps' difference.  Full-size architectures with random weights (``fast``)
or the tiny preset, float32 unless ``--dtype``.

Random weights are made at every start (most of an eager start's time).  With ``--from-disk`` they are
written once, as a user's downloads are (a diffusers folder, TAESD's folder, an open_clip
``.safetensors`` file), the model file names those, and every start reads them from disk: what a start
costs on a machine that has run the model before (the files in the page cache).

Usage: python benchmarks/cold_start.py [--preset fast] [--repeats 3] [--rounds 5] [--modes ...] [--from-disk]
                                      [--out benchmarks/results/cold_start.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("eager-first", "eager", "self-checked", "compile-cold", "compile-warm", "precompiled-build", "precompiled")
RUNTIME: dict[str, dict[str, Any]] = {  # mode → RuntimeConfig's compile settings
    "eager-first": {"precompiled": "off"}, "eager": {"precompiled": "off"}, "self-checked": {"precompiled": "off"},
    "compile-cold": {"compile": True}, "compile-warm": {"compile": True},
    "precompiled-build": {"precompiled": "build"}, "precompiled": {"precompiled": "auto"}}


def _image() -> Any:
    """The image every run scores (imported late, so that the child's imports count in its start)."""
    from clipfusion.inspection.fingerprint import probe_images

    return probe_images(count=2, size=256)[1]  # a colour field with a bright spot


def one(mode: str, model: str, dtype: str, repeats: int) -> None:
    """In a fresh process: load, first verdict (its wall-clock time printed), then steady repeats."""
    import statistics

    from clipfusion.config import RuntimeConfig
    from clipfusion.inspection import ModelFile
    from clipfusion.inspection.selfcheck import self_check
    from clipfusion.tasks.benchmark import _peak_rss_mb

    model_file = ModelFile.open(model)
    detector = model_file.detector(RuntimeConfig("cpu", dtype, **RUNTIME[mode]), batch_size=1)
    if mode == "self-checked":
        self_check(model_file, detector, "refuse")
    image = _image()
    detector.predict([image], "disc")
    first = time.time()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.predict([image], "disc")
        times.append(time.perf_counter() - start)
    print(json.dumps({"first_verdict_at": first, "steady_ms": round(1000 * statistics.median(times), 1),
                      "peak_rss_mb": round(_peak_rss_mb())}))  # VmHWM: ru_maxrss keeps the parent's peak


def steady(model: str, dtype: str, rounds: int) -> None:
    """Eager and precompiled in one process, interleaved, and how far their maps differ."""
    import numpy as np
    from _common import interleaved_median_ms

    from clipfusion.config import RuntimeConfig
    from clipfusion.inspection import ModelFile

    image = _image()
    detectors = {mode: ModelFile.open(model).detector(RuntimeConfig("cpu", dtype, **RUNTIME[mode]), batch_size=1)
                 for mode in ("eager", "precompiled")}
    figures = interleaved_median_ms({mode: functools.partial(d.predict, [image], "disc")
                                     for mode, d in detectors.items()}, rounds)
    for detector in detectors.values():
        detector.timings_.reset()  # the stages of the one call below
    maps = {mode: d.predict([image], "disc").maps for mode, d in detectors.items()}
    spread = float(np.ptp(maps["eager"])) or 1.0
    stages = {mode: {stage: round(1000 * seconds, 1) for stage, seconds in detector.timings_.seconds.items()}
              for mode, detector in detectors.items()}
    print(json.dumps({"eager_ms": figures["eager"], "precompiled_ms": figures["precompiled"],
                      "speedup": round(figures["eager"] / figures["precompiled"], 2),
                      "max_map_difference_of_range": float(np.abs(maps["eager"] - maps["precompiled"]).max() / spread),
                      "stages_ms": stages}))


def save_weights(folder: Path) -> None:
    """``fast``'s models with random weights, written where :func:`disk_weights` names them."""
    from safetensors.torch import save_file

    from clipfusion.config import ClipConfig, RuntimeConfig
    from clipfusion.encoders.loading import build_diffusion_from_configs, load_open_clip

    parts = build_diffusion_from_configs("sd15-unet", "taesd", "sd15-text-encoder")
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        getattr(parts, name).save_pretrained(folder / "sd" / name)
    parts.vae.save_pretrained(folder / "taesd")
    clip = load_open_clip(ClipConfig(pretrained=None), RuntimeConfig("cpu", "float32")).model
    save_file({name: tensor.contiguous() for name, tensor in clip.state_dict().items()},
              str(folder / "clip.safetensors"))


def disk_weights(folder: Path) -> list[str]:
    """The ``--set`` options of a model file that loads :func:`save_weights`' files."""
    return ["--set", f"diffusion__model_id={folder / 'sd'}", "--set", f"diffusion__vae_id={folder / 'taesd'}",
            "--set", f"clip__pretrained={folder / 'clip.safetensors'}"]


def _child(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    launched = time.time()
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{args}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), launched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast", choices=("fast", "tiny"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--from-disk", action="store_true",
                        help="fast's random weights written to disk once and read at every start")
    parser.add_argument("--out", default="benchmarks/results/cold_start.json")
    parser.add_argument("--save-weights", help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--steady", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one, args.model, args.dtype, args.repeats)
    if args.steady:
        return steady(args.model, args.dtype, args.rounds)
    if args.save_weights:
        return save_weights(Path(args.save_weights))

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import make_model, write_results

    from clipfusion.data.synthetic import SyntheticSpec, generate

    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        data = generate(folder / "data", SyntheticSpec(categories=("disc",), image_size=256, n_train=6,
                                                       n_test_good=1, n_test_per_defect=1), progress=False)
        weights = None
        if args.from_disk and args.preset == "fast":
            # in a child, so that this process stays small beside the starts it measures
            subprocess.run([sys.executable, __file__, "--save-weights", str(folder / "weights")], check=True)
            weights = disk_weights(folder / "weights")
        model = str(make_model(args.preset, data / "disc" / "train" / "good", folder / "disc.cfm", weights))
        env = {**os.environ, "CLIPFUSION_COMPILED_CACHE": str(folder / "packages"),
               "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "CLIPFUSION_TEXT_CACHE": str(folder / "text")}
        runs = []
        for mode in args.modes:
            if mode == "eager-first":
                shutil.rmtree(folder / "text", ignore_errors=True)
            result, launched = _child(["--one", mode, "--model", model, "--dtype", args.dtype, "--repeats",
                                       str(args.repeats)], env)
            row = {"mode": mode, "cold_start_s": round(result.pop("first_verdict_at") - launched, 1), **result}
            print(json.dumps(row), flush=True)
            runs.append(row)
        packages = folder / "packages"
        sizes = {path.name: round(sum(f.stat().st_size for f in path.iterdir()) / 1e6) for path in packages.iterdir()
                 if path.is_dir()} if packages.is_dir() else {}
        compared, _ = _child(["--steady", "--model", model, "--dtype", args.dtype, "--rounds", str(args.rounds)], env)
        print(json.dumps(compared), flush=True)
    write_results(args.out, runs, preset=args.preset, dtype=args.dtype, package_mb=sizes, steady=compared,
                  weights="read from disk" if args.from_disk else "random, made at every start",
                  command=" ".join(["python", "benchmarks/cold_start.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
