"""The ``clipfusion`` command line: argument parsing and dispatch only; the work is in ``clipfusion.tasks``."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from clipfusion import __version__
from clipfusion.command_examples import epilog
from clipfusion.config import (
    BENCHMARK_METHODS,
    DATASET_NAMES,
    DEFAULT_CATEGORY,
    DENSE_MODES,
    DTYPES,
    EXPORT_DTYPES,
    METHOD_NAMES,
    PRECOMPILED_MODES,
    PRESET_NAMES,
    RuntimeConfig,
    parse_overrides,
)
from clipfusion.errors import ClipfusionError
from clipfusion.outputs import os_advice

logger = logging.getLogger("clipfusion")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other user error of clipfusion."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (a batch size or pixel limit of 0 is a mistake, found at once)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-keys", default=None, metavar="DIR",
                        help="use only models signed by a key in DIR (*.pub from `clipfusion keygen`; revoked.txt "
                             "lists key ids no longer accepted); docs/deploy.md#signed-models")


def _add_self_check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--self-check", default="refuse", choices=("refuse", "warn", "off"),
                        help="at load, score the model file's probe images and compare with its fingerprint (what "
                             "it scored when its thresholds were set): refuse a model that scores otherwise, warn, "
                             "or skip (default: %(default)s; `clipfusion doctor` shows the whole check)")


def _add_drift_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("score drift (docs/reliability.md#score-drift)")
    group.add_argument("--drift-window", type=_positive, default=200, metavar="N",
                       help="verdicts per window compared with the held-out normal scores behind the threshold "
                            "(default: %(default)s)")
    group.add_argument("--drift-alarm-after", type=_positive, default=3, metavar="K",
                       help="bad windows in a row before the drift alarm (default: %(default)s)")


def _drift_settings(args: argparse.Namespace) -> Any:
    from clipfusion.inspection.drift import DriftSettings

    if args.drift_window < 10:
        raise ClipfusionError(f"--drift-window must be >= 10, not {args.drift_window}")
    return DriftSettings(window=args.drift_window, alarm_after=args.drift_alarm_after)


def _trusted(args: argparse.Namespace) -> Any:
    """The keys of ``--trusted-keys`` (None when not given)."""
    if getattr(args, "trusted_keys", None) is None:
        return None
    from clipfusion.signing import TrustedKeys

    return TrustedKeys.read(args.trusted_keys)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")


def _command(commands: Any, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=description, epilog=examples,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_reference_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--normal", required=required, default=None, metavar="DIR", help="folder of normal images")
    parser.add_argument("--category", required=required, default=DEFAULT_CATEGORY,
                        help="what the images show, used in prompts (e.g. bottle, metal_nut)")
    parser.add_argument("--shots", type=int, required=required, default=0,
                        help="normal references drawn from --normal")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference draw (default: 0)")


def _add_dataset_options(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES,
                        help="layout of --root")
    parser.add_argument("--root", required=True, help="dataset root folder")
    parser.add_argument("--categories", nargs="+", default=None, help="categories to run (default: all found)")
    parser.add_argument("--shots", nargs="+", type=int, default=[0],
                        help="numbers of normal references, 0 = zero-shot (default: 0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the reference draws")
    parser.add_argument("--out", default=out_default, help="output folder (default: %(default)s)")


def _add_run_options(parser: argparse.ArgumentParser, method: bool = True) -> None:
    if method:
        parser.add_argument("--method", default="clipfusion", choices=METHOD_NAMES,
                            help="detector to run (default: %(default)s)")
    parser.add_argument("--eval-size", default="256", metavar="N|native",
                        help="side of the square that maps and masks are resized to for pixel metrics, or "
                             "'native' for each mask's own size (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the earlier results in --out (clipfusion's own files only) instead of resuming")
    _add_processing_options(parser)


def _add_processing_options(parser: argparse.ArgumentParser) -> None:
    """What every command that reads images through the models takes: batching, the pixel limit,
    models and settings, verbosity."""
    _add_batch_options(parser)
    _add_model_options(parser)
    _add_common(parser)


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    from clipfusion.data.base import MAX_PIXELS

    parser.add_argument("--batch-size", type=_positive, default=8, help="images per model call (default: %(default)s)")
    parser.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N",
                        help="skip (and report) images larger than N pixels (default: %(default)s)")


def _add_engine_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("scale-out on Ray (pip install 'clipfusion[ray]'; docs/scale.md)")
    group.add_argument("--engine", default="local", choices=("local", "ray"),
                       help=f"local: this process; ray: {what} (default: %(default)s)")
    group.add_argument("--ray-address", default=None, metavar="auto|ray://HOST:10001",
                       help="the Ray cluster to use (default: start one on this machine)")
    group.add_argument("--workers", type=int, default=1, help="Ray workers at once (default: %(default)s)")
    group.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                       help="GPUs each Ray worker reserves (default: %(default)s)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                       help="CPUs each Ray worker reserves (default: %(default)s)")


def _ray_options(args: argparse.Namespace) -> Any:
    from clipfusion.ray_cluster import RayOptions

    return RayOptions(args.ray_address, args.workers, args.gpus_per_worker, args.cpus_per_worker)


def _recipe(method: str, params: dict[str, Any]) -> Any:
    """How each Ray worker builds its detector."""
    from clipfusion.distributed.recipe import DetectorRecipe

    return DetectorRecipe(method, params)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models and method settings")
    group.add_argument("--preset", default="paper-recon", choices=PRESET_NAMES, metavar="PRESET",
                       help=f"{', '.join(PRESET_NAMES)} (default: %(default)s; tiny = random offline models, "
                            "meaningless scores; docs/method.md)")
    _add_runtime_options(group)
    group.add_argument("--alpha", type=float, default=None, help="fusion weight α of CLIP (both tasks)")
    group.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing in pixels at 256 (0 = off)")
    group.add_argument("--timestep", type=int, default=None, help="diffusion noise timestep t (0-999)")
    group.add_argument("--dense-mode", default=None, choices=DENSE_MODES,
                       help="how PatchCLIP gets text-aligned patch embeddings")
    group.add_argument("--set", action="append", default=[], metavar="GROUP__FIELD=VALUE",
                       help="any CLIPFusion setting, e.g. --set fusion__maps='[\"clip_visual\"]' "
                            "--set mapdiff__attention_rule=difference (repeatable; see docs/method.md)")


def _add_runtime_options(group: Any) -> None:
    """Where and how the models run (not what they compute)."""
    group.add_argument("--device", default="auto",
                       help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: %(default)s)")
    group.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="auto: a model file's own precision where this machine computes it natively; otherwise "
                            "float16 on CUDA, bfloat16 on CPUs with native bf16 (AVX-512 BF16, AMX), float32 "
                            "elsewhere (default: %(default)s; docs/speed.md#one-precision-policy)")
    group.add_argument("--offline", action="store_true", help="never touch the network (weights from the cache)")
    group.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: the hub's own)")
    group.add_argument("--hub-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="how long the model hub may take to answer before only the local cache is used "
                            "(default: %(default)s)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet pass and the autoencoder (frozen weights, one image per call): "
                            "the same maps, minutes of compiling before the first image, then faster "
                            "(docs/speed.md); pays on long runs and in serve")
    group.add_argument("--precompiled", default=None, choices=PRECOMPILED_MODES,
                       help="the UNet pass and the autoencoder compiled ahead of time, once per model and machine "
                            "(`clipfusion compile`), loaded in seconds: auto = use them where built, else eager; "
                            "build = compile them first where missing (minutes); off = eager (default: auto for "
                            "serve and watch, off elsewhere; docs/speed.md)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` and the shortcut options (``--alpha``...) as overrides."""
    overrides = parse_overrides(args.set)
    shortcuts = {"fusion__alpha_seg": args.alpha, "fusion__alpha_cls": args.alpha, "fusion__sigma": args.sigma,
                 "diffusion__timestep": args.timestep, "patchclip__dense_mode": args.dense_mode}
    overrides.update({key: value for key, value in shortcuts.items() if value is not None})
    return overrides


def _runtime(args: argparse.Namespace) -> RuntimeConfig:
    """The runtime as asked: ``auto`` is resolved by each detector where it runs (a model file's recorded
    precision, a Ray worker's hardware)."""
    precompiled = args.precompiled or ("off" if args.compile else getattr(args, "precompiled_default", "off"))
    return RuntimeConfig(args.device, args.dtype, args.offline, args.cache_dir, args.hub_timeout, args.compile,
                         precompiled)


def _params(args: argparse.Namespace, method: str, preset: str | None = None) -> dict[str, Any]:
    """Constructor arguments of ``method`` from the command line (settings checked, no model loaded)."""
    from clipfusion.methods.registry import detector_params

    return detector_params(method, preset or args.preset or "paper-recon", _overrides(args),
                           functools.partial(_runtime, args), args.batch_size)


def _add_demo(commands: Any) -> None:
    demo = _command(commands, "demo", "run the main job on the bundled synthetic data and write a report",
                    "Generate (or reuse) the synthetic demo dataset and evaluate on it, zero- and few-shot.",
                    epilog("demo"))
    demo.add_argument("--out", default="clipfusion-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--data", default=None, help="where the synthetic data lives (default: user cache)")
    _add_run_options(demo, method=False)
    demo.set_defaults(preset="auto")


def _add_evaluate(commands: Any) -> None:
    evaluate = _command(commands, "evaluate", "score a method on a dataset: categories × shots × seeds, resumable",
                        "Evaluate a detector on MVTec-AD, VisA, your own folder or a meta.json index and write "
                        "results.json, results.md, per_image.csv and report.html to --out.",
                        epilog("evaluate"))
    _add_dataset_options(evaluate, "runs/evaluate")
    _add_run_options(evaluate)
    _add_engine_options(evaluate, "each (category, shots, seed) unit is a Ray task")


def _add_predict(commands: Any) -> None:
    predict = _command(commands, "predict", "score your own images: OK/NG, regions, overlays, results.csv, index.html",
                       "Score image files, folders (recursive) or glob patterns. Zero-shot by default; few-shot "
                       "with --normal DIR --shots k, or with a memory bank from `clipfusion fit` (--memory).",
                       epilog("predict"))
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    _add_reference_options(predict, required=False)
    predict.add_argument("--model", default=None, metavar="FILE.cfm|FOLDER",
                         help="inspection model written by `clipfusion fit --out FILE.cfm`: settings, references and "
                              "thresholds come from it, so it needs no other option; or a folder written by "
                              "`clipfusion export`, run by OpenVINO Runtime without torch")
    predict.add_argument("--memory", default=None, metavar="FILE", help="memory bank written by `clipfusion fit`")
    _add_trust_option(predict)
    predict.add_argument("--threshold", default=None, metavar="VALUE|auto",
                         help="image score above which an image is flagged; 'auto' derives it from the normal "
                              "images of --normal not used as references")
    predict.add_argument("--scale", default=None, metavar="LOW,HIGH",
                         help="fixed colour scale of the overlays (default: the model's, from its normal images' "
                              "maps; without thresholds 0,1)")
    predict.add_argument("--min-region-area", type=int, default=16, dest="min_area", metavar="PIXELS",
                         help="smallest region reported, in the image's own pixels (default: %(default)s)")
    predict.add_argument("--resume", action="store_true",
                         help="continue the run in --out: score only the images its results.jsonl lacks")
    predict.add_argument("--out", default="clipfusion-predict", help="output folder (default: %(default)s)")
    predict.add_argument("--method", default="clipfusion", choices=METHOD_NAMES)
    predict.add_argument("--overwrite", action="store_true",
                         help="replace an earlier predict run in --out (clipfusion's own files only)")
    _add_processing_options(predict)
    _add_engine_options(predict, "decoding in CPU tasks, scoring in --workers actors, each loading the model once; "
                                 "rows also as Parquet parts in parts/")
    predict.add_argument("--shared-out", action="store_true",
                         help="with --engine ray: --out is shared storage every node writes at the same path (NFS, "
                              "a shared volume), so the workers write the overlays, masks and maps themselves (they "
                              "do on a cluster that is this machine alone); docs/scale.md")
    predict.set_defaults(category=None, preset=None)  # None: not given (a model file then decides)


def _add_publish_option(parser: Any, folder: str) -> None:
    parser.add_argument("--publish", action="append", metavar="URL",
                        help="also publish each verdict (JSON, schema clipfusion.inspection/1), through an outbox in "
                             f"{folder} (none lost while the receiver is down): mqtt://HOST[:PORT]/TOPIC (QoS 1, "
                             "retained; user name and password from CLIPFUSION_MQTT_USERNAME/_PASSWORD; pip install "
                             "'clipfusion[line]'), https://URL (a webhook, signed with CLIPFUSION_WEBHOOK_SECRET), or "
                             "opc.tcp://HOST:PORT/PATH (clipfusion's own OPC UA server on that endpoint; "
                             "docs/line.md); repeat for several")


def _add_watch(commands: Any) -> None:
    watch = _command(commands, "watch", "score images as they arrive (a folder, a video, a camera), until stopped",
                     "Watch a hot folder, a video file, a stream (rtsp://, http://) or a camera (/dev/video0): each "
                     "new image or sampled frame is scored with --model and written as predict writes it "
                     "(results.jsonl/csv, overlays, masks), once, across restarts.", epilog("watch"))
    watch.add_argument("source", metavar="SOURCE",
                       help="the folder images arrive in (polled, and woken by file-system events: network shares "
                            "work), a video file, a stream URL (password from CLIPFUSION_STREAM_USERNAME/_PASSWORD) "
                            "or /dev/videoN")
    watch.add_argument("--model", required=True, metavar="FILE.cfm|FOLDER|NAME",
                       help="inspection model from `clipfusion fit` (or an export folder); with --server, the name "
                            "of one of the service's models")
    watch.add_argument("--server", metavar="URL",
                       help="score with a running `clipfusion serve` at URL instead of loading the model here (one "
                            "copy of the model for the service and the watch; key from CLIPFUSION_API_KEY)")
    _add_trust_option(watch)
    _add_self_check_option(watch)
    _add_drift_options(watch)
    watch.add_argument("--out", default="clipfusion-watch", help="output folder (default: %(default)s)")
    watch.add_argument("--pictures", choices=("all", "ng", "none"),
                       help="which images keep their overlay, thumbnail and raw map (an NG image always keeps its "
                            "mask): all, only NG ones, or none (default: all for a folder, ng for a video: a 1080p "
                            "overlay per frame costs more time and disk than the tiny preset's model pass)")
    watch.add_argument("--once", action="store_true",
                       help="a folder: score what is complete now, then stop; a stream: stop when it ends instead of "
                            "connecting again (a video file always stops at its end)")
    folder = watch.add_argument_group("a folder")
    folder.add_argument("--after", choices=("keep", "move", "delete"), default="keep",
                        help="what becomes of a scored file: keep it, move it to SOURCE/done/ (unreadable ones to "
                             "SOURCE/failed/), or delete it (default: %(default)s)")
    folder.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                        help="a file is taken once its size and time have held this long (default: %(default)s)")
    folder.add_argument("--poll", type=float, default=0.5, metavar="SECONDS",
                        help="how often the folder is looked at (default: %(default)s)")
    video = watch.add_argument_group("a video, stream or camera")
    video.add_argument("--every", type=int, default=1, metavar="N", help="score every N-th frame (default: every one)")
    video.add_argument("--fps", type=float, metavar="RATE", help="score RATE frames per second of the video's time")
    video.add_argument("--trigger", metavar="FILE|mqtt://HOST[:PORT]/TOPIC",
                       help="score the next frame each time FILE appears (it is then removed) or a message arrives "
                            "on the topic (a live source)")
    video.add_argument("--queue", type=int, default=4, metavar="FRAMES",
                       help="a live source keeps its newest FRAMES frames, dropping the oldest (default: %(default)s)")
    video.add_argument("--open-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="give up connecting after this long, and try again (default: %(default)s)")
    video.add_argument("--read-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="a stream silent this long is opened again (default: %(default)s)")
    video.add_argument("--frozen-after", type=float, default=10.0, metavar="SECONDS",
                       help="alarm when a live picture has not changed for this long (default: %(default)s)")
    _add_publish_option(watch, "--out")
    watch.add_argument("--db", metavar="URL",
                       help="also record each inspection in a service's database (a SQLAlchemy URL, as serve --db; "
                            "the embedded one is sqlite:////SERVE-DATA/inspections.db), through an outbox in --out; "
                            "the pictures stay in --out")
    watch.add_argument("--db-model", metavar="NAME",
                       help="the model's name in that database (default: the model file's name, as serve names it)")
    watch.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics (images, failures, the outboxes' backlog, frames dropped, "
                            "reconnections, frozen alarms) on http://--metrics-host:PORT/metrics")
    watch.add_argument("--metrics-host", default="127.0.0.1",
                       help="address of --metrics-port (default: %(default)s, this machine only)")
    watch.add_argument("--min-region-area", type=int, default=16, dest="min_area", metavar="PIXELS",
                       help="smallest region reported, in the image's own pixels (default: %(default)s)")
    _add_batch_options(watch)
    _add_runtime_options(watch.add_argument_group("where the model runs"))
    watch.set_defaults(precompiled_default="auto")
    _add_common(watch)


def _add_fit(commands: Any) -> None:
    fit = _command(commands, "fit", "build a few-shot memory bank from normal images, for predict --memory",
                   "Draw k normal references from a folder and save CLIPFusion's memory bank (safetensors).",
                   epilog("fit"))
    _add_reference_options(fit, required=True)
    fit.add_argument("--out", required=True,
                     help="model file to write (.cfm: settings, references, thresholds; for predict --model), or a "
                          "bare memory bank (.safetensors, for predict --memory)")
    _add_processing_options(fit)


def _add_db(commands: Any) -> None:
    db = _command(commands, "db", "bring the inspection database's schema up to date (before serve)",
                  "Apply the service's database migrations: what `serve` does at start, as a step of its own "
                  "(run it once when several services share one PostgreSQL).", epilog("db"))
    db.add_argument("action", choices=("upgrade",), help="upgrade: to the newest schema (idempotent)")
    db.add_argument("--db", default=None, metavar="URL", help="a SQLAlchemy database URL (default: the SQLite "
                                                             "database in --data)")
    db.add_argument("--data", default="clipfusion-serve", metavar="DIR", help="as for serve (default: %(default)s)")
    _add_common(db)


def _add_signing(commands: Any) -> None:
    keygen = _command(commands, "keygen", "make an Ed25519 key pair to sign model files and exports",
                      "Write a private key (PEM, readable by you only) and its public key (.pub) beside it.",
                      epilog("keygen"))
    keygen.add_argument("--out", required=True, metavar="FILE.key", help="the private key to write (never "
                                                                          "overwritten); the .pub goes beside it")
    _add_common(keygen)
    sign = _command(commands, "sign", "sign a model file or an export with your private key",
                    "Write the model's signature beside it (X.cfm.sig; clipfusion-export.sig in an export).",
                    epilog("sign"))
    sign.add_argument("model", metavar="MODEL", help="a model file (.cfm) or an export folder")
    sign.add_argument("--key", required=True, metavar="FILE.key", help="the private key from `clipfusion keygen`")
    _add_common(sign)
    verify = _command(commands, "verify", "check that a model is intact and signed by a trusted key",
                      "Check the model's contents and its signature against the trusted keys; exit 0 when both "
                      "hold, 2 (one line saying why) otherwise.", epilog("verify"))
    verify.add_argument("model", metavar="MODEL", help="a model file (.cfm) or an export folder")
    verify.add_argument("--trusted-keys", required=True, metavar="DIR", help="folder of approved public keys (*.pub)")
    _add_common(verify)


def _add_calibrate(commands: Any) -> None:
    calibrate = _command(commands, "calibrate", "derive a model file's thresholds again, in this machine's precision",
                         "Write a new model file with the thresholds of --model derived again from held-out normal "
                         "images, in the precision this machine runs.", epilog("calibrate"))
    calibrate.add_argument("--model", required=True, metavar="FILE.cfm", help="model file from `clipfusion fit`")
    calibrate.add_argument("--normal", required=True, metavar="DIR",
                           help="normal images (the model's own references among them are left out)")
    calibrate.add_argument("--out", required=True, metavar="FILE.cfm", help="the new model file (may be --model)")
    _add_batch_options(calibrate)
    _add_runtime_options(calibrate.add_argument_group("where the models run"))
    _add_common(calibrate)


def _add_export(commands: Any) -> None:
    export = _command(commands, "export", "write a model as OpenVINO or ONNX graphs for the torch-free runtime",
                      "Export a model file (or a preset and category, zero-shot) to a folder that `clipfusion "
                      "predict --model FOLDER` runs with OpenVINO Runtime, without torch.", epilog("export"))
    export.add_argument("--model", default=None, metavar="FILE.cfm", help="model file from `clipfusion fit`")
    export.add_argument("--preset", default=None, choices=PRESET_NAMES, metavar="PRESET",
                        help="without --model: a zero-shot export of this preset (no thresholds)")
    export.add_argument("--category", default=None, help="without --model: the object name used in prompts")
    export.add_argument("--format", default="openvino", choices=("openvino", "onnx"),
                        help="graph format (default: %(default)s)")
    export.add_argument("--weights", default="float32", choices=("float32", "int8"),
                        help="float32: PyTorch's maps (default); int8: OpenVINO weight compression (NNCF), smaller, "
                             "maps differ (docs/deploy.md)")
    export.add_argument("--out", required=True, metavar="FOLDER", help="the export folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.add_argument("--normal", metavar="DIR",
                        help="with --weights int8: normal images the model was not fitted on; the int8 graphs are run "
                             "on them beside the float32 model and the export is kept only if no decision flips")
    export.add_argument("--force", action="store_true",
                        help="keep an int8 export that flips decisions on --normal, or check it on probe images only")
    group = export.add_argument_group("where the weights come from")
    group.add_argument("--offline", action="store_true", help="never touch the network (weights from the cache)")
    group.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: the hub's own)")
    group.add_argument("--hub-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="how long the model hub may take to answer (default: %(default)s)")
    _add_common(export)


def _add_sweep(commands: Any) -> None:
    sweep = _command(commands, "sweep", "grid-search CLIPFusion settings on a dataset (calibrates settings)",
                     "Score every combination of --grid values. Fusion-level settings (fusion__*) reuse the "
                     "encoder outputs and cost no extra model pass; others re-encode once per combination.",
                     epilog("sweep"))
    _add_dataset_options(sweep, "runs/sweep")
    sweep.add_argument("--grid", action="append", required=True, metavar="GROUP__FIELD=V1,V2",
                       help="values to try for one setting (repeatable); JSON list for list values")
    sweep.add_argument("--metric", default="pixel_aupro", help="what 'best' means (default: %(default)s)")
    sweep.add_argument("--select-on", nargs="+", default=None, metavar="CATEGORY",
                       help="choose the best setting on these categories only and report it on the others "
                            "(without it, choice and report use the same test labels: optimistic)")
    sweep.add_argument("--eval-size", default="256", metavar="N|native", help="as for evaluate (default: 256)")
    _add_processing_options(sweep)
    _add_engine_options(sweep, "each (encoder setting, category, shots, seed) model pass is a Ray task")


def _add_benchmark(commands: Any) -> None:
    bench = _command(commands, "benchmark", "time CLIPFusion and WinCLIP side by side (full size, random weights)",
                     "Per-image time and per-stage split of each method, preset, shots and batch size, measured "
                     "in one run with random-weight models (speed does not depend on weights): benchmark.json "
                     "and benchmark.md in --out.", epilog("benchmark"))
    bench.add_argument("--methods", nargs="+", default=["clipfusion", "winclip"], choices=BENCHMARK_METHODS)
    bench.add_argument("--presets", nargs="+", default=["paper-recon", "fast"], choices=PRESET_NAMES)
    bench.add_argument("--shots", nargs="+", type=int, default=[0, 4])
    bench.add_argument("--batch-size", nargs="+", type=int, default=[1, 8], dest="batch_sizes")
    bench.add_argument("--images", type=int, default=4, help="test images per measurement (default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=2, help="measurements per configuration (default: %(default)s)")
    bench.add_argument("--no-naive", action="store_true", help="skip the naive reference run of paper-recon")
    bench.add_argument("--device", default="auto",
                       help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: %(default)s)")
    bench.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="auto: the default every command runs at (float16 on CUDA, bfloat16 on CPUs with "
                            "native bf16, float32 elsewhere); both methods run at it (default: %(default)s)")
    bench.add_argument("--out", default="runs/benchmark", help="output folder (default: %(default)s)")
    _add_common(bench)


def _add_serve(commands: Any) -> None:
    serve = _command(commands, "serve", "the inspection service: REST API, operator page, inspection database",
                     "Serve model files (from `clipfusion fit`) over HTTP: POST images, get OK/NG, regions and "
                     "overlays; every inspection is kept in a database (SQLite in --data by default).",
                     epilog("serve"))
    serve.add_argument("--model", action="append", required=True, metavar="FILE.cfm|FOLDER", dest="models",
                       help="model file to serve, or a folder from `clipfusion export` (run without torch; "
                            "repeatable)")
    _add_trust_option(serve)
    _add_self_check_option(serve)
    _add_drift_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                                                           "machine only; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--data", default="clipfusion-serve", metavar="DIR",
                       help="the SQLite database and each inspection's files (default: %(default)s)")
    serve.add_argument("--db", default=None, metavar="URL",
                       help="a SQLAlchemy database URL instead of SQLite, e.g. postgresql+psycopg://user@host/db")
    serve.add_argument("--store-images", default=None, metavar="DIR",
                       help="keep every uploaded file in DIR (with --learn they are kept in --data by default)")
    serve.add_argument("--keep-days", type=float, default=None, metavar="N",
                       help="delete the files of inspections older than N days: overlays, masks, maps, thumbnails "
                            "and stored uploads (checked hourly; the inspections' rows stay)")
    serve.add_argument("--learn", action="store_true",
                       help="a false alarm confirmed by an operator joins the model's memory bank as a new model "
                            "version (uploads are kept; undo with POST /v1/models/NAME/rollback)")
    serve.add_argument("--read-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="refuse an upload that sends nothing for this long (408; default: %(default)s)")
    serve.add_argument("--deadline", type=float, default=300.0, metavar="SECONDS",
                       help="answer 504 to a request still waiting for its inspections after this long (default: "
                            "%(default)s)")
    serve.add_argument("--min-normals", type=_positive, default=10, metavar="N",
                       help="with --learn: re-derive the thresholds only from at least N operator-confirmed normal "
                            "images outside the bank; fewer keep them, and the answer says why (default: "
                            "%(default)s)")
    serve.add_argument("--max-batch", type=_positive, default=8, help="images per model batch (default: %(default)s)")
    serve.add_argument("--max-batch-megapixels", type=float, default=8.0, metavar="MP",
                       help="pixels per model batch: a larger image goes alone, so small ones are not held up "
                            "(default: %(default)s)")
    serve.add_argument("--replicas", type=_positive, default=1, metavar="N",
                       help="copies of each model running batches at once: threads sharing its weights and the "
                            "cores, or with --engine ray replicas on the cluster (default: %(default)s)")
    cluster = serve.add_argument_group("model replicas on a Ray cluster (pip install 'clipfusion[ray]'; "
                                       "docs/service.md#replicas)")
    cluster.add_argument("--engine", default="local", choices=("local", "ray"),
                         help="local: the models run in this process; ray: as Ray Serve replicas on a cluster "
                              "(default: %(default)s)")
    cluster.add_argument("--ray-address", default=None, metavar="auto|ray://HOST:10001",
                         help="the Ray cluster (default: start one on this machine)")
    cluster.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C",
                         help="CPUs each Ray replica reserves (default: %(default)s)")
    cluster.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                         help="GPUs each Ray replica reserves (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="how long a batch may wait to fill (default: %(default)s)")
    serve.add_argument("--max-queue", type=_positive, default=64,
                       help="images waiting per model before answering 503 (default: %(default)s)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default: %(default)s)")
    serve.add_argument("--max-pixels", type=_positive, default=40_000_000, metavar="N",
                       help="largest image in pixels (default: %(default)s; at most --pixel-budget)")
    serve.add_argument("--min-region-area", type=int, default=16, dest="min_area", metavar="PIXELS",
                       help="smallest region reported (default: %(default)s)")
    serve.add_argument("--pixel-budget", type=_positive, default=50, metavar="MEGAPIXELS",
                       help="megapixels all requests in flight may decode together (about 45 MB of memory each); "
                            "beyond it requests get 503 + Retry-After before anything is decoded (default: "
                            "%(default)s; docs/service.md#memory)")
    serve.add_argument("--min-free-mb", type=_positive, default=500, metavar="MB",
                       help="/readyz reports not ready below this much free disk in --data (default: %(default)s)")
    serve.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="accepted API keys, one per line as NAME ROLE KEY (ROLE: operator inspects and gives "
                            "feedback, admin also learns and rolls back); without it the API needs no key")
    serve.add_argument("--docs", action="store_true",
                       help="serve the API's documentation at /docs and /openapi.json (from the package, no CDN; "
                            "behind the key when keys are on)")
    _add_publish_option(serve, "--data/outbox")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="text lines, or one JSON object per line with the request id (default: %(default)s)")
    serve.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    _add_runtime_options(serve.add_argument_group("where the models run"))
    serve.set_defaults(precompiled_default="auto")
    _add_common(serve)


def _add_compile(commands: Any) -> None:
    compile_ = _command(commands, "compile", "compile a model file's UNet pass and autoencoder for this machine, once",
                        "Build the packages that serve and watch (--precompiled auto, their default) and predict "
                        "(--precompiled auto) load in seconds instead of running eager: torch's AOTInductor, "
                        "weights frozen in, one per model and machine (torch version, CPU, precision, settings) "
                        "in $CLIPFUSION_COMPILED_CACHE (default ~/.cache/clipfusion/compiled). Minutes, once.",
                        epilog("compile"))
    compile_.add_argument("--model", required=True, metavar="FILE.cfm", help="model file from `clipfusion fit`")
    group = compile_.add_argument_group("where the models run")
    _add_runtime_options(group)
    compile_.set_defaults(precompiled_default="build")
    _add_common(compile_)


def _add_synth(commands: Any) -> None:
    synth = _command(commands, "synth", "write the synthetic dataset (MVTec layout, exact masks) to a folder",
                     "Generate the deterministic synthetic anomaly dataset used by the demo and the tests.",
                     epilog("synth"))
    synth.add_argument("--out", required=True, help="folder to write")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    _add_common(synth)


def _add_doctor(commands: Any) -> None:
    doctor = _command(commands, "doctor", "check that this machine scores a model file as it did when fitted",
                      "Recompute the model file's fingerprint here (seeded probe images, and its held-out normal "
                      "images with --normal) and compare: same, within tolerance, or different (exit status 1: "
                      "recalibrate). Never downloads weights.", epilog("doctor"))
    doctor.add_argument("--model", required=True, metavar="FILE.cfm", help="model file from `clipfusion fit`")
    doctor.add_argument("--normal", metavar="DIR",
                        help="the normal images the thresholds were set on (matched by content): scored again too")
    _add_batch_options(doctor)
    _add_runtime_options(doctor.add_argument_group("where the models run"))
    _add_common(doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clipfusion",
        description="Zero- and few-shot visual anomaly detection with CLIP and Stable Diffusion (CLIPFusion).",
    )
    parser.add_argument("--version", action="version", version=f"clipfusion {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_watch(commands)
    _add_fit(commands)
    _add_calibrate(commands)
    _add_doctor(commands)
    _add_compile(commands)
    _add_signing(commands)
    _add_db(commands)
    _add_export(commands)
    _add_sweep(commands)
    _add_benchmark(commands)
    _add_serve(commands)
    _add_synth(commands)
    return parser


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from clipfusion.tasks.evaluate import parse_eval_size, run_evaluation

    out = Path(args.out)
    params = _params(args, args.method)
    engine, worker_runtime = None, None
    if args.engine == "ray":
        from clipfusion.distributed.evaluate import RayUnits

        engine = RayUnits(_ray_options(args), _recipe(args.method, params))
        worker_runtime = (args.device, args.dtype)
    run_evaluation(args.method, params, args.dataset, Path(args.root).expanduser(),
                   args.categories, args.shots, args.seeds, out, parse_eval_size(args.eval_size), args.batch_size,
                   args.overwrite, progress=not args.quiet, max_pixels=args.max_pixels, engine=engine,
                   worker_runtime=worker_runtime)
    print((out / "results.md").read_text())


def _cmd_demo(args: argparse.Namespace) -> None:
    from clipfusion.tasks.demo import default_data_dir, demo_preset, run_demo, tiny_notice
    from clipfusion.tasks.evaluate import parse_eval_size

    data = Path(args.data) if args.data else default_data_dir()
    preset = demo_preset(args.preset, args.cache_dir)
    print(f"clipfusion demo: CLIPFusion, WinCLIP and a colour-distance baseline on synthetic data ({data}),\n"
          f"zero-shot and 1-shot, preset '{preset}'.")
    if preset == "tiny":
        print(tiny_notice(chosen_by_user=args.preset == "tiny"))
    elif _device_dtype(args)[0] == "cpu":
        logger.warning("real models on the CPU: expect 20-30 minutes (about 9 s per image); add --device cuda on "
                       "a GPU machine, or --preset tiny for the quick offline run")
    table, report = run_demo(data, Path(args.out), preset, lambda method, name: _params(args, method, name),
                             parse_eval_size(args.eval_size), args.batch_size, args.overwrite,
                             progress=not args.quiet, max_pixels=args.max_pixels)
    print(table)
    print(f"\nreport: {report.resolve()}   (per-method files in {Path(args.out).resolve()}/<method>/)")


def _make_detector(args: argparse.Namespace, method: str) -> Any:
    from clipfusion.methods.registry import make_detector_factory

    return make_detector_factory(method, **_params(args, method))()


def _cmd_fit(args: argparse.Namespace) -> None:
    from clipfusion.methods.clipfusion.model_file import MODEL_SUFFIX
    from clipfusion.tasks.fit import fit_memory, fit_model

    make_detector = functools.partial(_make_detector, args, "clipfusion")
    if Path(args.out).suffix == MODEL_SUFFIX:
        path, fitted = fit_model(make_detector, args.normal, args.category, args.shots, args.seed, args.out,
                                 args.max_pixels, progress=not args.quiet)
        thresholds = fitted.thresholds_
        print(f"wrote {path}: {args.category}, {args.shots} references, image threshold {thresholds.image:.4f} and "
              f"pixel threshold {thresholds.pixel:.4f} from {thresholds.n_normals} held-out normal images")
        return
    path, names = fit_memory(make_detector, args.normal, args.category, args.shots, args.seed, args.out,
                             args.max_pixels)
    print(f"wrote {path}: {len(names)} references of {args.category} ({', '.join(names)})")


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from clipfusion.tasks.fit import calibrate_model

    path, before, detector = calibrate_model(args.model, args.normal, args.out, _runtime(args), args.batch_size,
                                             args.max_pixels, progress=not args.quiet)
    after = detector.thresholds_
    print(f"wrote {path}: image threshold {before.image:.4f} -> {after.image:.4f}, pixel threshold {before.pixel:.4f} "
          f"-> {after.pixel:.4f}, derived in {detector.precision} from {after.n_normals} normal images")


def _cmd_doctor(args: argparse.Namespace) -> int:
    from clipfusion.tasks.doctor import checkup

    result = checkup(args.model, _runtime(args), args.normal, args.batch_size)
    print(result.table())
    return result.exit_status


def _cmd_compile(args: argparse.Namespace) -> None:
    from clipfusion.tasks.precompile import precompile

    if Path(args.model).is_dir():
        raise ClipfusionError(f"--model {args.model} is an export folder, which OpenVINO Runtime compiles when it "
                              "loads: pass the .cfm model file it came from")
    if args.compile or args.precompiled not in (None, "build"):
        raise ClipfusionError("compile builds the precompiled parts: drop --compile and --precompiled")
    result = precompile(args.model, _runtime(args))
    print(result.summary())


def _cmd_export(args: argparse.Namespace) -> None:
    from clipfusion.inspection import ModelFile

    if bool(args.model) == bool(args.preset or args.category):
        raise ClipfusionError("give either --model FILE.cfm or --preset and --category (zero-shot)")
    if not args.model and not (args.preset and args.category):
        raise ClipfusionError("a zero-shot export needs both --preset and --category")
    # a mistyped, foreign or damaged file is reported before torch and OpenVINO load
    model = ModelFile.open(args.model) if args.model else None
    if (args.normal or args.force) and args.weights != "int8":
        raise ClipfusionError("--normal and --force check int8 weights: drop them, or add --weights int8")
    from clipfusion.tasks.inputs import int8_check_images

    check = int8_check_images(model, args.normal, args.force) if args.weights == "int8" else None
    from clipfusion.export.writer import export_model

    runtime = RuntimeConfig("cpu", "float32", args.offline, args.cache_dir, args.hub_timeout)
    out = export_model(Path(args.out), args.format, runtime, model=model, preset=args.preset,
                       category=args.category, overwrite=args.overwrite, weights=args.weights, check=check,
                       force=args.force)
    print(f"wrote {out.resolve()} ({args.format}); run it with: clipfusion predict IMAGES --model {out}")


def _model_paths(args: argparse.Namespace) -> list[str]:
    """The ``--model`` values of predict and watch (one) or serve (several)."""
    return getattr(args, "models", None) or ([args.model] if getattr(args, "model", None) else [])


def _refuse_torch_options_for_exports(args: argparse.Namespace) -> None:
    """An export folder runs on OpenVINO Runtime, on the CPU in float32 or bfloat16: options of PyTorch
    models that it would silently ignore are refused."""
    exports = [model for model in _model_paths(args) if Path(model).is_dir()]
    if not exports:
        return
    for option, given in (("--compile", args.compile), ("--precompiled", args.precompiled)):
        if given:
            raise ClipfusionError(f"{option} runs PyTorch models; an export folder is compiled by OpenVINO Runtime "
                                  f"when it loads: drop {option}")
    ignored = [f"--{name} {value}" for name, value, fits in (("device", args.device, ("auto", "cpu")),
                                                             ("dtype", args.dtype, EXPORT_DTYPES))
               if value not in fits]
    if ignored:
        raise ClipfusionError(f"--model {exports[0]} is an export, which OpenVINO Runtime runs on the CPU in float32 "
                              f"or bfloat16: drop {' '.join(ignored)}, or pass the .cfm model file it came from to run "
                              "PyTorch there")


def _open_model(args: argparse.Namespace) -> Any:
    """``predict --model``, opened once (card checked, file hashed) and held against the other options; the
    category and preset then come from it."""
    from clipfusion.inspection import ModelFile

    model = ModelFile.open(args.model, _trusted(args))
    model.check_options({"--memory": args.memory, "--normal": args.normal, "--shots": args.shots,
                         "--set/--alpha/--sigma/--timestep/--dense-mode": _overrides(args)},
                        args.method, args.category, args.preset)
    if args.engine == "ray" and model.is_export:
        raise ClipfusionError(f"--model {args.model} is an export, which runs with the local engine; drop --engine "
                              "ray, or pass the .cfm model file it came from")
    args.category, args.preset = model.category, model.preset
    return model


def _cmd_predict(args: argparse.Namespace) -> None:
    from clipfusion.tasks.predict import PredictJob, choose_engine, plan_predict, run_predict

    _refuse_torch_options_for_exports(args)
    if args.shared_out and args.engine != "ray":
        raise ClipfusionError("--shared-out tells Ray's workers that they can write --out: use it with --engine ray")
    if args.trusted_keys and not args.model:
        raise ClipfusionError("--trusted-keys checks the signature of --model: give the signed model file or export")
    model = _open_model(args) if args.model else None
    if model is None:
        args.category, args.preset = args.category or DEFAULT_CATEGORY, args.preset or "paper-recon"
    job = PredictJob(inputs=args.paths, category=args.category, out=args.out, method=args.method, preset=args.preset,
                     model=args.model, normal=args.normal, shots=args.shots, seed=args.seed, memory=args.memory,
                     threshold=args.threshold, scale=args.scale, min_area=args.min_area, batch_size=args.batch_size,
                     progress=not args.quiet, overwrite=args.overwrite, resume=args.resume,
                     max_pixels=args.max_pixels)
    # every mistake in the options, inputs and --out is reported before a model loads or Ray starts
    plan = plan_predict(job, local=args.engine == "local")
    detector, engine = choose_engine(args.engine, args.method, functools.partial(_params, args, args.method), model,
                                     _runtime(args), args.batch_size,
                                     _ray_options(args) if args.engine == "ray" else None, args.shared_out)
    summary, decisions = run_predict(job, plan, detector, engine, model)
    out = Path(args.out).resolve()
    print(f"scored {summary['images']} images ({len(summary['skipped'])} skipped) → {out / 'results.csv'}")
    if decisions.image is not None:
        print(f"{summary['NG']} NG at image threshold {decisions.image:.4f} ({decisions.how})")
    print(f"open {out / 'index.html'}")


def _cmd_watch(args: argparse.Namespace) -> None:
    from clipfusion.feeds.video import is_video
    from clipfusion.publishing.sinks import open_outboxes
    from clipfusion.tasks.watch import FeedOptions, Watcher, open_feed, run_id

    _refuse_torch_options_for_exports(args)
    out = Path(args.out)
    feed = open_feed(args.source, out, FeedOptions(args.settle, args.poll, args.after, args.once, args.every,
                                                   args.fps, args.trigger, args.queue, args.open_timeout,
                                                   args.read_timeout, args.frozen_after), args.max_pixels)
    if args.db and args.server:
        raise ClipfusionError("--server records every inspection in the service's database already: drop --db")
    # the receivers first: a mistyped address is reported before a model loads for a minute
    outboxes = open_outboxes(args.publish or [], out, "clipfusion-watch")
    if args.db:
        from clipfusion.publishing.outbox import Outbox
        from clipfusion.service.database_sink import DatabaseSink
        from clipfusion.service.settings import model_name

        outboxes.append(Outbox(out, DatabaseSink(args.db, args.db_model or model_name(Path(args.model)))))
    identifier = run_id(out)
    pictures = args.pictures or ("ng" if is_video(args.source) else "all")
    judge, described = _server_judge(args, identifier, pictures) if args.server else _local_judge(args, pictures)
    watcher = Watcher(feed, out, judge, outboxes, args.batch_size, identifier)
    if args.metrics_port is not None:
        from clipfusion.tasks.watch_metrics import serve_metrics

        serve_metrics(watcher, args.metrics_host, args.metrics_port)
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish the batch under way, then stop
        signal.signal(sig, lambda *_: watcher.stop.set())
    print(f"clipfusion watch: {feed.description} → {out.resolve()} ({described}); stop with Ctrl-C", flush=True)
    taken = watcher.run()
    print(f"watched: {watcher.scored} images scored, {watcher.failed} failed this time ({taken} taken) → "
          f"{out.resolve() / 'results.csv'}")


def _local_judge(args: argparse.Namespace, pictures: Any) -> tuple[Any, str]:
    """``watch --model FILE``: the model loaded here."""
    from clipfusion.inspection import Inspector, ModelFile
    from clipfusion.inspection.core import InspectionSettings
    from clipfusion.inspection.drift import DriftMonitor
    from clipfusion.inspection.selfcheck import self_check
    from clipfusion.tasks.watch import local_judge

    model = ModelFile.open(args.model, _trusted(args))
    inspector = Inspector.from_model(model, _runtime(args), args.batch_size, args.min_area, args.max_pixels)
    self_check(model, inspector.detector, args.self_check)
    if (status := inspector.precompiled_status(args.model)) is not None:
        logger.info("model %s: %s", model.short_id, status)
    settings = InspectionSettings(inspector.decisions, model.category, model.sha256, args.min_area, args.max_pixels,
                                  model.signer)
    threshold = inspector.decisions.image
    drift = None if threshold is None else DriftMonitor(model.reference_scores, threshold, _drift_settings(args))
    return local_judge(inspector, settings, pictures, drift), f"model {model.short_id}"


def _server_judge(args: argparse.Namespace, identifier: str, pictures: Any) -> tuple[Any, str]:
    """``watch --server URL --model NAME``: the model NAME of a running service."""
    from clipfusion.service_client import ServiceClient
    from clipfusion.tasks.watch import Judge

    given = [option for option, value in (("--trusted-keys", args.trusted_keys), ("--compile", args.compile),
                                          ("--precompiled", args.precompiled)) if value]
    if given:
        raise ClipfusionError(f"--server scores with the service's model, loaded and checked there: drop "
                              f"{' and '.join(given)}")
    client = ServiceClient(args.server, args.model, identifier, pictures)
    info = client.info
    judge = Judge(client.inspect, info["category"], info["sha256"], info["image_threshold"], info["pixel_threshold"])
    return judge, f"model {args.model} of {args.server}"


def _cmd_sweep(args: argparse.Namespace) -> None:
    from clipfusion.data import load_dataset
    from clipfusion.evaluation.sweep_units import SweepConfig
    from clipfusion.tasks.evaluate import parse_eval_size
    from clipfusion.tasks.sweep import parse_grid, run_sweep

    dataset = load_dataset(args.dataset, Path(args.root).expanduser())
    config = SweepConfig(
        preset=args.preset, categories=dataset.check_categories(args.categories), shots=args.shots,
        seeds=args.seeds, grid=parse_grid(args.grid), overrides=_overrides(args),
        eval_size=parse_eval_size(args.eval_size), metric=args.metric, batch_size=args.batch_size,
        select_on=args.select_on, max_pixels=args.max_pixels,
    )
    engine = None
    if args.engine == "ray":
        from clipfusion.distributed.evaluate import RaySweep

        engine = RaySweep(_ray_options(args))
    run_sweep(config, dataset, _runtime(args), args.out, progress=not args.quiet, engine=engine)
    print((Path(args.out) / "sweep.md").read_text())


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from clipfusion.run_folders import check_output_folder
    from clipfusion.tasks.benchmark import BENCHMARK_OUTPUTS, BenchmarkSpec, run_benchmark, write_benchmark

    if args.images < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        raise ClipfusionError("--images, --repeats and --batch-size must be >= 1")
    check_output_folder(Path(args.out), "benchmark", BENCHMARK_OUTPUTS)  # before minutes of measuring
    device, dtype = _device_dtype(args)
    spec = BenchmarkSpec(methods=args.methods, presets=args.presets, shots=args.shots, batch_sizes=args.batch_sizes,
                         images=args.images, repeats=args.repeats, naive_reference=not args.no_naive,
                         device=device, dtype=dtype)
    out = write_benchmark(run_benchmark(spec, progress=not args.quiet), args.out)
    print((out / "benchmark.md").read_text())


def _cmd_serve(args: argparse.Namespace) -> None:
    from clipfusion.runtime.manifest import is_export

    for model in args.models:  # before the service's imports: a mistyped path is reported at once
        if not (Path(model).is_file() or is_export(Path(model))):
            raise ClipfusionError(f"--model {model} is neither a model file nor an export folder; write one with "
                                  f"`clipfusion fit --out {model}` or `clipfusion export --out {model}`")
    _refuse_torch_options_for_exports(args)
    trusted = _trusted(args)
    if trusted is not None:  # before the service starts: a model nobody approved is one line, exit 2
        from clipfusion.inspection import ModelFile

        for model in args.models:
            ModelFile.open(model, trusted)
    try:
        from clipfusion.service.app import create_app
        from clipfusion.service.server import run
    except ImportError as exc:
        raise ClipfusionError(f"the service needs its extra packages ({exc.name} is missing): "
                              "pip install 'clipfusion[serve]'") from None
    from clipfusion.ray_cluster import RayOptions
    from clipfusion.service.logs import log_config
    from clipfusion.service.settings import ServiceSettings, read_api_keys

    settings = ServiceSettings(
        models=tuple(Path(m) for m in args.models), data_dir=Path(args.data), database_url=args.db,
        runtime=_runtime(args), batch_size=args.max_batch, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
        min_area=args.min_area, api_keys=read_api_keys(args.api_key_file),
        store_images=Path(args.store_images) if args.store_images else None,
        learn=args.learn, keep_days=args.keep_days, trusted_keys=trusted, self_check=args.self_check,
        drift=_drift_settings(args), min_free_mb=args.min_free_mb,
        pixel_budget=args.pixel_budget * 1_000_000, min_normals=args.min_normals, read_timeout=args.read_timeout,
        deadline=args.deadline, docs=args.docs, replicas=args.replicas, publish=tuple(args.publish or ()),
        max_batch_pixels=int(args.max_batch_megapixels * 1_000_000),
        ray=RayOptions(args.ray_address, args.replicas, args.gpus_per_replica, args.cpus_per_replica)
        if args.engine == "ray" else None)
    app = create_app(settings)
    api = " (API at /docs)" if args.docs else ""
    print(f"clipfusion serve: http://{args.host}:{args.port}/{api}, data in {Path(args.data).resolve()}", flush=True)
    # the drain waits for the requests accepted before the signal: at most as long as one may wait
    run(app, args.host, args.port, log_config(args.log_format, args.quiet), drain_limit=settings.deadline)


def _cmd_db(args: argparse.Namespace) -> None:
    try:
        from clipfusion.service.database import current_revision, make_engine, migrate
        from clipfusion.service.settings import embedded_url
    except ImportError as exc:
        raise ClipfusionError(f"the database needs the service's packages ({exc.name} is missing): "
                              "pip install 'clipfusion[serve]'") from None
    url = args.db or embedded_url(Path(args.data))
    if args.db is None:
        Path(args.data).mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        migrate(engine)
        print(f"database schema: {before or 'empty'} -> {current_revision(engine)}")
    finally:
        engine.dispose()


def _cmd_keygen(args: argparse.Namespace) -> None:
    from clipfusion.signing import generate_key

    private, public, key = generate_key(Path(args.out))
    print(f"wrote {private} (private: keep it to yourself) and {public} (key id {key}: copy it into the "
          "--trusted-keys folder of every inspection PC)")


def _cmd_sign(args: argparse.Namespace) -> None:
    from clipfusion.inspection import ModelFile
    from clipfusion.signing import sign

    model = ModelFile.open(args.model)  # only an intact model is signed
    path, key = sign(model.path, model.sha256, Path(args.key))
    print(f"signed {model.short_id} with key {key}: {path}")


def _cmd_verify(args: argparse.Namespace) -> None:
    from clipfusion.inspection import ModelFile

    model = ModelFile.open(args.model, _trusted(args))
    print(f"{model.short_id}: intact, signed by trusted key {model.signer}")


def _cmd_synth(args: argparse.Namespace) -> None:
    from clipfusion.data.synthetic import SyntheticSpec, generate

    out = generate(args.out, SyntheticSpec(image_size=args.size, seed=args.seed), progress=not args.quiet)
    print(f"wrote the synthetic dataset to {out}")


# The libraries whose own log lines are notes for their developers, not for a user of clipfusion.
THIRD_PARTY_LOGGERS = ("huggingface_hub", "diffusers", "transformers", "open_clip", "timm")


def _configure_output(quiet: bool, debug: bool = False) -> None:
    """clipfusion's log on stderr; with ``quiet``, only warnings and errors, and other packages' warnings
    (Python warnings and their loggers' lines) go to the log at debug level (shown with ``--debug``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("clipfusion: %(levelname)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if quiet:  # read by diffusers and transformers when they are imported (later, by the models)
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if quiet and not debug else logging.WARNING)
    package = Path(__file__).parent

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if quiet and package not in Path(filename).parents:
            logger.debug("%s from %s:%d: %s", category.__name__, filename, lineno, message)
            return
        sys.stderr.write(f"clipfusion: warning: {message}\n")

    warnings.showwarning = show


# what the 'models' extra installs (an exported model runs without them)
MODEL_PACKAGES = ("torch", "torchvision", "diffusers", "open_clip", "transformers", "sklearn", "skimage")

INTERRUPTED = {
    "evaluate": "finished (category, shots, seed) units are kept: run the same command to resume",
    "demo": "finished units are kept: run the same command to resume",
    "watch": "every image scored so far is in results.jsonl and watch.jsonl: run the same command to go on",
    "sweep": "nothing was written; run it again", "predict": "every image finished so far is in results.jsonl "
    "and results.csv; add --resume to the same command to score the rest",
    "fit": "no memory bank was written", "benchmark": "nothing was written",
    "calibrate": "no model file was written", "doctor": "nothing was checked",
    "compile": "a package being built is left unfinished and never used: run it again",
    "db": "the migration's transaction was rolled back",
    "keygen": "no key was written", "sign": "no signature was written", "verify": "nothing was checked",
    "export": "the folder holds no complete export; run it again",
    "synth": "the dataset is incomplete; run it again",
    "serve": "stopped",
}


def _device_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """``--device auto`` / ``--dtype auto`` made concrete for commands that run no model file (benchmark,
    demo).  Resolved at the first need, not at start-up: ``--device auto`` imports torch (seconds), which a
    one-line error need not wait for."""
    from clipfusion.hardware import auto_device_dtype

    return auto_device_dtype(args.device, args.dtype)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_output(args.quiet, args.debug)
    commands: dict[str, Callable[[argparse.Namespace], int | None]] = {
        "demo": _cmd_demo, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "watch": _cmd_watch, "fit": _cmd_fit,
        "calibrate": _cmd_calibrate, "doctor": _cmd_doctor, "compile": _cmd_compile, "export": _cmd_export,
        "keygen": _cmd_keygen, "sign": _cmd_sign, "verify": _cmd_verify, "db": _cmd_db, "sweep": _cmd_sweep,
        "benchmark": _cmd_benchmark, "synth": _cmd_synth, "serve": _cmd_serve}
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logger]):  # a log line never breaks a progress bar
            status = commands[args.command](args)
    except ClipfusionError as exc:
        if args.debug:
            raise
        print(f"clipfusion: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if args.debug or exc.name not in MODEL_PACKAGES:
            raise
        print(f"clipfusion: error: {args.command} needs {exc.name}, which this installation lacks: pip install "
              "'clipfusion[models]' (an exported model runs without it: docs/deploy.md)", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only or vanished folders, permissions: the user's to fix
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"clipfusion: error: {exc.strerror or exc}{where}; {os_advice(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipfusion: interrupted; {INTERRUPTED[args.command]}", file=sys.stderr)
        return 130
    return status or 0  # doctor's verdict; every other command returns None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
