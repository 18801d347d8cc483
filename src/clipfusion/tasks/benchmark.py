"""Side-by-side speed of CLIPFusion and WinCLIP: full-size architectures, random weights, one run.

Speed does not depend on weight values, so every model is built at full size with random weights
(``clip__pretrained=None``, ``diffusion__model_id=random:sd15``; ``random:taesd`` for the fast
preset): nothing is downloaded.  One preset at a time (WinCLIP measured beside each), every
configuration of it is warmed up once, then all are measured in turn, ``repeats`` times (interleaved,
so slow drifts of the machine hit all alike), and the median per image is reported with the per-stage
split from the detectors' stage timers; then that preset's models are released before the next
preset's are built, and each row's ``peak_rss_mb`` is its preset's peak alone (Linux).

``clipfusion-openvino`` is CLIPFusion exported (``clipfusion export``, OpenVINO IR, float32) and run by
the torch-free runtime (``clipfusion-openvino-int8``: with 8-bit weights).  It is the same random-weight
detector as the ``clipfusion`` row, so the two rows compare engines on identical models.  Its export
and load times are reported, and its maps are compared with PyTorch's (``agreement``: max |Δ| per
branch relative to PyTorch's map range; with random weights this measures numerical agreement only,
not accuracy).  Graphs run one image at a time (batch 1).

``clipfusion-compiled`` is the ``clipfusion`` detector with ``RuntimeConfig.compile`` (``--compile``):
UNet pass and autoencoder through ``torch.compile`` with frozen weights, one image per call.  Its
warm-up, which compiles, is reported as its setup time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clipfusion import __version__
from clipfusion.config import MAP_NAMES, TINY, Preset, RuntimeConfig, get_preset, override
from clipfusion.data import MVTecDataset, read_rgb
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.encoders import cache
from clipfusion.errors import ClipfusionError
from clipfusion.hardware import cpu_info, torch_cpu_build
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.methods.winclip import WinCLIP
from clipfusion.outputs import write_atomic
from clipfusion.run_folders import output_folder

EXPORTED = {"clipfusion-openvino": "float32", "clipfusion-openvino-int8": "int8"}  # method: exported weights

RANDOM_DIFFUSION = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "random:sd15",
                    "stabilityai/stable-diffusion-2-1-base": "random:sd21-base"}


def random_weight_preset(name: str, naive: bool = False) -> Preset:
    """Preset ``name`` with its models swapped for the same architectures with random weights."""
    preset = get_preset(name)
    if preset.diffusion.model_id == TINY:
        return override(preset, diffusion__naive=naive)
    model_id = RANDOM_DIFFUSION.get(preset.diffusion.model_id)
    if model_id is None:
        raise ClipfusionError(f"no random-weight architecture known for {preset.diffusion.model_id}")
    vae_id = "random:taesd" if preset.diffusion.vae_id else None
    return override(preset, clip__pretrained=None, diffusion__model_id=model_id, diffusion__vae_id=vae_id,
                    diffusion__naive=naive)


@dataclass
class BenchmarkSpec:
    methods: list[str] = field(default_factory=lambda: ["clipfusion", "winclip"])
    presets: list[str] = field(default_factory=lambda: ["paper-recon", "fast"])
    shots: list[int] = field(default_factory=lambda: [0, 4])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    images: int = 4
    repeats: int = 2
    naive_reference: bool = True
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class _Config:
    method: str
    preset: str
    shots: int
    batch_size: int
    detector: Any
    times: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    # an export's: export, load (to compiled graphs); a compiled detector's: compile (its warm-up)
    setup_seconds: dict[str, float] = field(default_factory=dict)
    source: Any = None  # an export's PyTorch detector


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _reset_peak_rss() -> None:
    """Start this process's peak RSS again from what it holds now (Linux: ``5`` into clear_refs resets
    VmHWM), so each preset's models are charged only their own peak."""
    with contextlib.suppress(OSError):
        PROC_CLEAR_REFS.write_text("5")


def _peak_rss_mb() -> float:
    """The peak RSS since the last :func:`_reset_peak_rss` (Linux's VmHWM); elsewhere the process's."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(line for line in PROC_STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _images(count: int, shots: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Test images and normal references from the synthetic generator (256², like MVTec's smaller side)."""
    with tempfile.TemporaryDirectory() as folder:
        spec = SyntheticSpec(categories=("disc",), n_train=max(shots, 1), n_test_good=count, n_test_per_defect=count)
        dataset = MVTecDataset(generate(folder, spec, progress=False))
        tests = [s.load().image for s in dataset.test_samples("disc")][:count]
        references = [read_rgb(p) for p in dataset.train_images("disc")][:shots]
    return tests, references


def _exported(method: str, detector: CLIPFusion, preset: str, shots: int, folder: Path) -> _Config:
    """The OpenVINO row ``method`` of ``detector``: exported into ``folder`` and loaded, both timed."""
    from clipfusion.export.writer import export_detector
    from clipfusion.runtime.exported import ExportedDetector

    start = time.perf_counter()
    export = export_detector(detector, "disc", folder / f"{method}-{preset}-{shots}shot", weights=EXPORTED[method])
    exported_at = time.perf_counter()
    runtime = ExportedDetector(export, dtype=detector.precision)  # the precision of the PyTorch row it is held to
    loaded_at = time.perf_counter()
    return _Config(method, preset, shots, 1, runtime, source=detector, setup_seconds={
        "export": round(exported_at - start, 1), "load": round(loaded_at - exported_at, 1)})


def _agreement(configs: list[_Config], tests: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per exported row: max |Δ| of each branch map, the fused map and the score against the PyTorch
    detector it came from, relative to PyTorch's range of that map (the score: of the fused map; s_clip,
    a probability: absolute)."""
    found = {}
    for config in configs:
        if config.method not in EXPORTED:
            continue
        source = config.source
        expected, got = source.encode(tests, "disc"), config.detector.encode(tests, "disc")
        differences = {}
        differences["clip_score"] = _relative(got.clip_score, expected.clip_score, 1.0)  # a probability: absolute
        for name in MAP_NAMES:
            if getattr(expected, name) is not None:
                differences[name] = _relative(getattr(got, name), getattr(expected, name))
                # random weights can give a map of almost no range (references ≈ queries), which inflates
                # its relative figure: the range itself says how much that map weighs in the fused one
                differences[f"{name}_range"] = float(f"{float(np.ptp(getattr(expected, name))):.3g}")
        fused, exported = source.predict(tests, "disc"), config.detector.predict(tests, "disc")
        differences["fused_map"] = _relative(exported.maps, fused.maps)
        differences["score"] = _relative(exported.scores, fused.scores, float(np.ptp(fused.maps)))
        found[f"{config.method}_{config.preset}_{config.shots}shot"] = differences
    return found


def _relative(got: np.ndarray, expected: np.ndarray, scale: float | None = None) -> float:
    scale = float(np.ptp(expected)) if scale is None else scale
    return float(f"{float(np.abs(got - expected).max()) / max(scale, 1e-12):.3g}")


def _configs(spec: BenchmarkSpec, runtime: RuntimeConfig, references: list[np.ndarray],
             folder: Path) -> list[_Config]:
    configs: list[_Config] = []
    fitted: dict[tuple[str, str, int], Any] = {}

    def detector(method: str, preset_name: str, shots: int, naive: bool = False) -> Any:
        key = (method, preset_name + ("-naive" if naive else ""), shots)
        if key not in fitted:
            preset = random_weight_preset(preset_name, naive)
            made: CLIPFusion | WinCLIP
            if method == "winclip":
                made = WinCLIP(preset, runtime)
            else:
                made = CLIPFusion(preset, dataclasses.replace(runtime, compile=method == "clipfusion-compiled"))
            if shots:
                made.fit(references[:shots], "disc")
            fitted[key] = made
        return fitted[key]

    for method in spec.methods:
        for preset_name in spec.presets:
            for shots in spec.shots:
                if method in EXPORTED:  # graphs of batch 1: one row per preset and shots
                    configs.append(_exported(method, detector("clipfusion", preset_name, shots), preset_name, shots,
                                             folder))
                    continue
                for batch in spec.batch_sizes:
                    configs.append(_Config(method, preset_name, shots, batch, detector(method, preset_name, shots)))
    if spec.naive_reference and "clipfusion" in spec.methods and "paper-recon" in spec.presets:
        configs.append(_Config("clipfusion-naive", "paper-recon", 0, 1, detector("clipfusion", "paper-recon", 0, True)))
    return configs


def run_benchmark(spec: BenchmarkSpec, progress: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="clipfusion-benchmark-") as folder:  # exports, deleted at the end
        return _run_benchmark(spec, progress, Path(folder))


def _run_benchmark(spec: BenchmarkSpec, progress: bool, folder: Path) -> dict[str, Any]:
    """One preset at a time, WinCLIP beside each: its models built, measured (interleaved), then released
    before the next preset's are built, so the peak memory is one preset's, not every variant's at once
    (both presets' PyTorch models and exports together outgrew 24 GB)."""
    runtime = RuntimeConfig(spec.device, spec.dtype)
    tests, references = _images(spec.images, max(spec.shots))
    runs: list[dict[str, Any]] = []
    agreement: dict[str, dict[str, float]] = {}
    build_seconds = 0.0
    for preset in spec.presets:
        _reset_peak_rss()
        configs = _configs(dataclasses.replace(spec, presets=[preset]), runtime, references, folder)
        group_runs, seconds = _measure(configs, spec, tests, progress)
        runs += group_runs
        build_seconds += seconds
        agreement |= _agreement(configs, tests)
        del configs
        cache.release()
    return {"runs": runs, "ratios": _ratios(runs), "agreement": agreement, "spec": spec.__dict__,
            "build_and_warmup_seconds": round(build_seconds, 1), "machine": machine_info(runtime)}


def _measure(configs: list[_Config], spec: BenchmarkSpec, tests: list[np.ndarray], progress: bool
             ) -> tuple[list[dict[str, Any]], float]:
    """``configs`` warmed up, then measured in interleaved rounds: their rows, and the seconds the builds
    and warm-ups took."""
    build_start = time.perf_counter()
    for config in tqdm(configs, desc="warm-up (builds the models)", disable=not progress):
        config.detector.batch_size = config.batch_size
        start = time.perf_counter()
        config.detector.predict(tests[:1], "disc")
        if config.method == "clipfusion-compiled" and not config.setup_seconds:
            config.setup_seconds = {"compile": round(time.perf_counter() - start, 1)}
    build_seconds = time.perf_counter() - build_start
    with tqdm(total=spec.repeats * len(configs), desc="measuring", disable=not progress) as bar:
        for _ in range(spec.repeats):
            for config in configs:
                config.detector.batch_size = config.batch_size
                config.detector.timings_.reset()
                start = time.perf_counter()
                config.detector.predict(tests, "disc")
                config.times.append((time.perf_counter() - start) / len(tests))
                config.stages.append({k: v / len(tests) for k, v in config.detector.timings_.seconds.items()})
                config.peak_rss_mb = _peak_rss_mb()
                bar.update(1)
    runs = [{
        "method": c.method, "preset": c.preset, "shots": c.shots, "batch_size": c.batch_size,
        "ms_per_image": round(1000 * statistics.median(c.times), 1),
        "stages": {k: round(1000 * statistics.median(s.get(k, 0.0) for s in c.stages), 1)
                   for k in sorted({k for s in c.stages for k in s})},
        "peak_rss_mb": round(c.peak_rss_mb),
        **({"setup_seconds": c.setup_seconds} if c.setup_seconds else {}),
    } for c in configs]
    return runs, build_seconds


def _find(runs: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    return next((r for r in runs if all(r[k] == v for k, v in where.items())), None)


def _ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Speed-ups the project tracks (larger = faster), from batch-1 runs unless named otherwise."""
    ratios = {}
    for batch in sorted({r["batch_size"] for r in runs}):
        suffix = "" if batch == 1 else f"_batch{batch}"
        for method, name in (("clipfusion", ""), ("clipfusion-compiled", "_compiled")):
            for preset in ("fast", "paper-recon"):
                # WinCLIP as measured beside this preset (interleaved with it)
                winclip = _find(runs, method="winclip", preset=preset, shots=0, batch_size=batch)
                ours = _find(runs, method=method, preset=preset, shots=0, batch_size=batch)
                if winclip and ours:
                    ratios[f"{preset}{name}_vs_winclip_zero_shot{suffix}"] = round(
                        winclip["ms_per_image"] / ours["ms_per_image"], 2)
    for run in runs:
        if run["method"] == "clipfusion-compiled":
            eager = _find(runs, method="clipfusion", preset=run["preset"], shots=run["shots"],
                          batch_size=run["batch_size"])
            if eager:
                ratios[f"{run['preset']}_{run['shots']}shot_batch{run['batch_size']}_compiled_vs_eager"] = round(
                    eager["ms_per_image"] / run["ms_per_image"], 2)
        if run["method"] in EXPORTED:
            eager = _find(runs, method="clipfusion", preset=run["preset"], shots=run["shots"], batch_size=1)
            if eager:
                ratios[f"{run['preset']}_{run['shots']}shot_{run['method']}_vs_pytorch"] = round(
                    eager["ms_per_image"] / run["ms_per_image"], 2)
    naive = _find(runs, method="clipfusion-naive")
    paper = _find(runs, method="clipfusion", preset="paper-recon", shots=0, batch_size=1)
    if naive and paper:
        ratios["paper_recon_vs_naive"] = round(naive["ms_per_image"] / paper["ms_per_image"], 2)
    for run in runs:
        if run["method"] == "clipfusion" and run["shots"] > 0 and run["batch_size"] == 1:
            share = run["stages"].get("memory", 0.0) / run["ms_per_image"]
            ratios[f"{run['preset']}_{run['shots']}shot_memory_search_share"] = round(share, 3)
    return ratios


def machine_info(runtime: RuntimeConfig) -> dict[str, Any]:
    """Where a figure came from: versions, the CPU and its speed flags, threads, and ``runtime``'s device
    and dtype (``auto`` resolved)."""
    runtime = runtime.resolved()[0]
    cpu = cpu_info()
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "clipfusion": __version__, "cpu": cpu.model, "cpus": cpu.cores,
                            "cpu_flags": list(cpu.flags), "torch_cpu": torch_cpu_build(),
                            "threads": torch.get_num_threads(), "device": runtime.device, "dtype": runtime.dtype}
    if runtime.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _plain(value: Any) -> str:
    """A machine fact as text: lists joined, dicts as key=value."""
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def render_markdown(result: dict[str, Any]) -> str:
    stages = sorted({k for r in result["runs"] for k in r["stages"]})
    lines = ["# clipfusion benchmark", "",
             f"Full-size architectures with random weights; {result['spec']['images']} images; median of "
             f"{result['spec']['repeats']} interleaved repeats after a warm-up; ms per image. Machine: "
             + ", ".join(f"{k} {_plain(v)}" for k, v in result["machine"].items()) + ".", "",
             "| method | preset | shots | batch | ms/image | " + " | ".join(stages) + " | peak RSS MB |",
             "|---|---|---:|---:|---:|" + "---:|" * len(stages) + "---:|"]
    for r in result["runs"]:
        cells = [str(r["stages"].get(s, "–")) for s in stages]
        lines.append(f"| {r['method']} | {r['preset']} | {r['shots']} | {r['batch_size']} | {r['ms_per_image']} | "
                     + " | ".join(cells) + f" | {r['peak_rss_mb']} |")
    lines += ["", "Ratios (larger = faster):", ""]
    lines += [f"- {name}: {value}" for name, value in result["ratios"].items()]
    for r in result["runs"]:
        if "compile" in r.get("setup_seconds", {}):
            lines.append(f"- {r['method']} {r['preset']} {r['shots']}-shot batch {r['batch_size']}: warm-up with "
                         f"compiling {r['setup_seconds']['compile']} s")
        elif "setup_seconds" in r:
            lines.append(f"- {r['method']} {r['preset']} {r['shots']}-shot: export {r['setup_seconds']['export']} s, "
                         f"load and compile {r['setup_seconds']['load']} s")
    if result.get("agreement"):
        lines += ["", "Exported (OpenVINO) vs PyTorch float32 on the same random weights: max |Δ| relative "
                  "to PyTorch's range of each map (numerical agreement only, not accuracy):", ""]
        lines += [f"- {name}: " + ", ".join(f"{k} {v:.2g}" for k, v in values.items())
                  for name, values in result["agreement"].items()]
    return "\n".join(lines) + "\n"


BENCHMARK_OUTPUTS = ("benchmark.json", "benchmark.md")


def write_benchmark(result: dict[str, Any], out: str | Path) -> Path:
    with output_folder(Path(out), "benchmark", BENCHMARK_OUTPUTS, overwrite=True) as folder:
        write_atomic(folder / "benchmark.json", json.dumps(result, indent=2) + "\n")
        write_atomic(folder / "benchmark.md", render_markdown(result))
    return folder
