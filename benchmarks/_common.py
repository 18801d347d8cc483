"""Helpers shared by the benchmark scripts: one subprocess per measurement, one results file."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

# `fast` with its models swapped for the same architectures with random weights (speed does not
# depend on weight values, and no weights need downloading).
RANDOM_FAST = ["--set", "clip__pretrained=null", "--set", "diffusion__model_id=random:sd15",
               "--set", "diffusion__vae_id=random:taesd"]


def clipfusion_command() -> str:
    return str(Path(sys.executable).with_name("clipfusion"))


def make_model(preset: str, normal: Path, out: Path, weights: list[str] | None = None) -> Path:
    """A zero-shot model file of ``preset`` (random weights for fast) with thresholds from ``normal``;
    ``weights``: the ``--set`` options naming the models to load instead (default: fast's random ones)."""
    extra = (RANDOM_FAST if weights is None else weights) if preset == "fast" else []
    subprocess.run([clipfusion_command(), "fit", "--normal", str(normal), "--category", "disc", "--shots", "0",
                    "--preset", preset, *extra, "--out", str(out), "--quiet"], check=True)
    return out


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


def interleaved_median_ms(calls: Mapping[str, Callable[[], object]], repeats: int,
                          before: Callable[[str], object] = lambda key: None) -> dict[str, float]:
    """{key: median wall time of ``calls[key]`` in ms} over ``repeats`` rounds that each run every call
    once in turn, after one warm-up round, so drift on a shared machine hits every call alike.
    ``before(key)`` runs untimed before each call (switching a module's memory layout, say)."""
    times: dict[str, list[float]] = {key: [] for key in calls}
    for round_ in range(repeats + 1):
        for key, call in calls.items():
            before(key)
            start = time.perf_counter()
            call()
            if round_:
                times[key].append(time.perf_counter() - start)
    return {key: round(1000 * statistics.median(values), 1) for key, values in times.items()}


def run_isolated(script: str, args: list[str]) -> dict:
    """Run ``script --one ...`` in a fresh interpreter (so its peak RSS is its own); its last line is JSON."""
    output = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    return result


def write_results(path: str, runs: list[dict], **extra: object) -> None:
    """``runs`` with the machine they ran on (the CPU, its speed flags, torch's CPU build) as JSON."""
    import torch

    from clipfusion.hardware import cpu_info, torch_cpu_build

    cpu = cpu_info()
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu.model,
               "cpus": cpu.cores, "cpu_flags": list(cpu.flags), "torch_cpu": torch_cpu_build(),
               "threads": torch.get_num_threads()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"runs": runs, **extra, "machine": machine}, indent=2) + "\n")
