"""The examples and notes under each command's ``--help``, in one table: the CLI formats them
(:func:`epilog`), the docs quote them."""
from __future__ import annotations

import textwrap

# command → ([(command line, what it does or "")], a note printed after them)
EXAMPLES: dict[str, tuple[list[tuple[str, str]], str]] = {
    "evaluate": (
        [
            ("clipfusion evaluate --dataset mvtec --root ~/data/mvtec_anomaly_detection \\\n    --shots 0 1 2 4 "
             "--seeds 0 1 2 --out runs/mvtec",
             ""),
            ("clipfusion evaluate --dataset visa --root ~/data/VisA_20220922 --categories candle pcb1 --out "
             "runs/visa",
             ""),
            ("clipfusion evaluate --dataset folder --root ~/data/my_part --shots 1 --eval-size native --out "
             "runs/mine",
             ""),
        ],
        'Running the same command again skips the (category, shots, seed) units already in --out.',
    ),
    "predict": (
        [
            ("clipfusion predict new_parts/ --model bottle.cfm",
             "a model from `clipfusion fit`"),
            ("clipfusion predict photos/ --category bottle",
             "zero-shot, real weights"),
            ("clipfusion predict photos/*.jpg --category bottle --normal good/ --shots 4 --threshold auto",
             ""),
            ("clipfusion predict part.png --memory bottle-4shot.safetensors --category bottle --threshold 0.62",
             ""),
            ("clipfusion predict photos/ --preset tiny --out /tmp/try",
             "offline smoke test (meaningless scores)"),
            ("clipfusion predict new_parts/ --model bottle.cfm --resume",
             "after an interruption: the rest only"),
        ],
        'Streams one row per image to results.jsonl and results.csv as it is scored (path, score, normalised '
        "score, OK/NG, threshold, regions with bounding boxes in the image's pixels, overlay/mask/map files, "
        'seconds, model id, time), and writes overlays/*.png (the image at its own size with the map on the '
        "model's fixed colour scale, region boxes, the verdict and a colour bar), masks/*.png (NG images), "
        'maps/*.npy (raw maps) and, at the end, index.html (sorted by score, filter OK/NG).',
    ),
    "export": (
        [
            ("clipfusion export --model bottle.cfm --out bottle-ov",
             "OpenVINO IR (default)"),
            ("clipfusion export --model bottle.cfm --format onnx --out bottle-onnx",
             "ONNX"),
            ("clipfusion export --preset fast --category bottle --out bottle-zero-ov",
             "zero-shot, no thresholds"),
            ("clipfusion predict new_parts/ --model bottle-ov --out inspection",
             "runs without torch"),
        ],
        'The folder holds three graphs (CLIP image tower, VAE encoder, the UNet up to the last block the maps '
        'need) with the prompts, noise and memory bank as constants, and clipfusion-export.json (settings, '
        'thresholds, versions, a SHA-256 of every file). Copy the whole folder to the inspection PC and install '
        "'clipfusion[runtime]' there (no torch): docs/deploy.md.",
    ),
    "fit": (
        [
            ("clipfusion fit --normal good/ --category bottle --shots 4 --out bottle.cfm",
             "inspection model file"),
            ("clipfusion predict new_parts/ --model bottle.cfm",
             "needs no other option"),
            ("clipfusion fit --normal good/ --category bottle --shots 0 --out bottle-0shot.cfm",
             "zero-shot, thresholds only"),
            ("clipfusion fit --normal good/ --category bottle --shots 4 --out bottle-4shot.safetensors",
             "bare memory bank"),
        ],
        'A .cfm model file holds the settings, the references (names and SHA-256), the memory bank, and an image '
        'and a pixel threshold derived from the normal images of --normal that are not references (99% and 99.9% '
        'quantiles of their scores and map values; the rule and count are recorded).',
    ),
    "calibrate": (
        [
            ('clipfusion calibrate --model bottle.cfm --normal good/ --out bottle-here.cfm',
             "this machine's precision"),
            ("clipfusion calibrate --model bottle.cfm --normal good/ --out bottle-fp32.cfm --dtype float32",
             ""),
        ],
        "Derives the image and pixel thresholds again from the normal images of --normal that are not the model's "
        'references (recognised by content), in the precision this machine runs (--dtype auto: bfloat16 on CPUs '
        'with native bf16, float16 on CUDA, float32 elsewhere), and writes a new model file that records it. Use '
        'it when a model fitted on another machine runs here in another precision (predict and serve say so).',
    ),
    "compile": (
        [
            ("clipfusion compile --model bottle.cfm", "once per model and machine: minutes"),
            ("clipfusion serve --model bottle.cfm", "then starts in seconds, compiled"),
            ("clipfusion predict images/ --model bottle.cfm --out run/ --precompiled auto", ""),
        ],
        "Compiles the UNet pass and the autoencoder with torch's AOTInductor (weights frozen in, as --compile does "
        "in the process) into packages in $CLIPFUSION_COMPILED_CACHE (default ~/.cache/clipfusion/compiled). A "
        "package is for one model's weights, settings and precision on one kind of machine and torch version; "
        "anything else looks for another, so a stale package is never used. serve and watch use them by default "
        "(--precompiled auto) and run eager where none is built; --precompiled build compiles a missing one at "
        "start instead.",
    ),
    "doctor": (
        [
            ("clipfusion doctor --model bottle.cfm", "the probe images: seconds"),
            ("clipfusion doctor --model bottle.cfm --normal good/ && systemctl start clipfusion",
             "also the held-out normals; gate a start on it"),
        ],
        "Prints one table: Python, torch/OpenVINO, the CPU and the precision that will run, the encoder weights "
        "found, the model file's integrity, and the verdict of its fingerprint (what it scored when its thresholds "
        "were set): same; within tolerance (a precision change within the measured bfloat16/float32 difference); "
        "different (exit status 1): a setting, an encoder's weights or the scores changed, so the thresholds may not "
        "hold: run clipfusion calibrate.",
    ),
    "sweep": (
        [
            ("clipfusion sweep --dataset mvtec --root ~/data/mvtec_anomaly_detection --categories bottle screw "
             "carpet \\\\\n    --select-on bottle screw --grid fusion__alpha_seg=0.1,0.3,0.5,0.7,0.9 --grid "
             "diffusion__timestep=50,100,200 \\\\\n    --device cuda",
             ""),
            ('clipfusion sweep --dataset mvtec --root data/synthetic --preset tiny --shots 1 \\\\\n    --grid '
             'patchclip__dense_mode=vv,window --grid '
             '\'fusion__maps=[["clip_visual"],["clip_visual","diff_visual"]]\'',
             ''),
        ],
        'Writes sweep.json (every row, the per-setting means, the best setting) and sweep.md.',
    ),
    "benchmark": (
        [
            ("clipfusion benchmark --methods clipfusion winclip --presets paper-recon fast --images 4 --out bench",
             ""),
            ("clipfusion benchmark --device cuda --dtype float16 --batch-size 1 8 32 --images 32 --out bench-gpu",
             ""),
        ],
        '',
    ),
    "serve": (
        [
            ("clipfusion serve --model bottle.cfm --docs",
             "http://127.0.0.1:8000 (operator page), the API at /docs"),
            ("clipfusion serve --model bottle.cfm --model screw.cfm --port 8080 --data /var/lib/clipfusion",
             ""),
            ("clipfusion serve --model bottle.cfm --db postgresql+psycopg://user:pw@db/inspections --api-key-file "
             "keys.txt --log-format json",
             "keys.txt: NAME operator|admin KEY per line"),
            ("curl -F files=@part.png http://127.0.0.1:8000/v1/models/bottle/inspect",
             ""),
        ],
        'Each model is served under its file name (bottle.cfm → /v1/models/bottle). docs/service.md describes the API.',
    ),
    "synth": (
        [
            ("clipfusion synth --out data/synthetic",
             ""),
            ("clipfusion synth --out data/synthetic-512 --size 512 --seed 1",
             ""),
            ("clipfusion evaluate --dataset mvtec --root data/synthetic --preset tiny --shots 0 1",
             ""),
        ],
        '',
    ),
    "demo": (
        [
            ("clipfusion demo",
             "synthetic data in the user cache, report in ./clipfusion-demo"),
            ("clipfusion demo --out /tmp/demo --quiet",
             ""),
        ],
        '',
    ),
    "keygen": (
        [("clipfusion keygen --out ~/keys/quality.key", "writes quality.key and quality.pub"),
         ("cp ~/keys/quality.pub /etc/clipfusion/trusted/", "on every inspection PC")],
        "Keep the private key off the inspection PCs; they need only the .pub.",
    ),
    "sign": (
        [("clipfusion sign bottle.cfm --key ~/keys/quality.key", "writes bottle.cfm.sig"),
         ("clipfusion sign bottle-ov --key ~/keys/quality.key", "an export: bottle-ov/clipfusion-export.sig")],
        "The signature covers every byte the model is read from (the model file, or the export's manifest with "
        "its checksum of every file); copy it with the model.",
    ),
    "verify": (
        [("clipfusion verify bottle.cfm --trusted-keys /etc/clipfusion/trusted", ""),
         ("clipfusion predict parts/ --model bottle.cfm --trusted-keys /etc/clipfusion/trusted",
          "refuses an unsigned model")],
        "A missing, foreign, revoked (revoked.txt in the folder) or forged signature, or a model changed after "
        "signing, exits 2 with one line saying which.",
    ),
    "watch": (
        [("clipfusion watch /srv/camera-drop --model bottle.cfm --out /var/lib/clipfusion/line-3",
          "until stopped (Ctrl-C, SIGTERM)"),
         ("clipfusion watch incoming/ --model bottle.cfm --out results/ --after move", "scored files to done/"),
         ("clipfusion watch incoming/ --model bottle.cfm --out results/ --once", "what is there now, then stop"),
         ("clipfusion watch rtsp://10.0.3.21/stream1 --model bottle.cfm --out line-3 --fps 2", "a camera, 2 frames/s"),
         ("clipfusion watch shift.mp4 --model bottle.cfm --out shift --every 5", "every 5th frame of a video file"),
         ("clipfusion watch incoming/ --model bottle.cfm --publish mqtt://broker/line3/verdicts", "verdicts to MQTT")],
        "Rows, overlays and masks as predict writes them; a file is taken once its size has held for --settle "
        "seconds, and once only: a restart resumes (watch.jsonl in --out records every image taken).",
    ),
    "db": (
        [("clipfusion db upgrade --db postgresql+psycopg://inspect@db/line", "once, before the services start"),
         ("clipfusion db upgrade --data /var/lib/clipfusion", "the embedded SQLite database")],
        "serve migrates at start too; on PostgreSQL under an advisory lock, so services starting together take "
        "turns.",
    ),
}


def epilog(command: str) -> str:
    """The ``--help`` epilog of ``command``: its examples (their comments aligned), then its note, wrapped."""
    rows, note = EXAMPLES[command]
    width = max((len(line.splitlines()[-1]) for line, comment in rows if comment), default=0)
    lines = ["examples:"]
    for line, comment in rows:
        text = "\n".join("  " + part for part in line.splitlines())
        if comment:
            text += " " * (width - len(line.splitlines()[-1]) + 2) + "# " + comment
        lines.append(text)
    return "\n".join(lines) + ("\n\n" + textwrap.fill(note, 100) + "\n" if note else "\n")
