#!/usr/bin/env bash
# GPU figures for the README (run on a machine with an NVIDIA GPU; about 3-5 minutes on an H100/H200).
# fp16, batch 1/8/32, both methods, both presets; random weights, nothing downloaded.
# Extra arguments go to `clipfusion benchmark` (e.g. --methods clipfusion winclip to leave out the compiled row).
# Writes benchmarks/results/gpu.json and gpu.md (or into $OUT/ when OUT is set, e.g. on a lent device).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 "$python" benchmarks/methods.py --out "$out" --name gpu --device cuda --dtype float16 \
    --batch-size 1 8 32 --images 32 --repeats 3 --quiet "$@"
cat "$out/gpu.md"
