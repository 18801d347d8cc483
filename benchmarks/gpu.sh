#!/usr/bin/env bash
# GPU figures for the README (a machine with an NVIDIA GPU; about 8 minutes on an H200). Random weights,
# nothing downloaded. Three steps, each bounded so that a slow one still leaves the files of the others:
#   1. smoke: the tiny preset, every method, at float16 on the GPU (under a minute); a failure stops here
#   2. gpu.json/gpu.md: both methods, both presets, fp16, batch 1/8/32 (eager)
#   3. gpu-compiled.json/gpu-compiled.md: `fast` with --compile against eager, batch 1/8
# DEVICE=cuda:1 picks another GPU. Extra arguments go to step 2's `clipfusion benchmark`. Results go to benchmarks/results/, or to $OUT when
# it is set (a lent device machine). Where diffusers/open_clip are missing (the lent H200 has torch only),
# wheels in .whl/ (scripts/gpu-wheels.sh downloads them) are installed to /tmp/site first; then call the
# device with carry [".whl"] and the command `bash benchmarks/gpu.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
out=${OUT:-benchmarks/results}
logs=${OUT:-$(mktemp -d)}  # the console logs come back with the files from a device machine
mkdir -p "$out"
if ! "$python" -c "import diffusers, open_clip" 2>/dev/null && [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" -c "import clipfusion" 2>/dev/null || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
common=(--device "${DEVICE:-cuda}" --dtype float16 --quiet --debug)
timeout 120 "$python" benchmarks/methods.py --out "$(mktemp -d)" --name smoke --presets tiny --images 2 \
    --batch-size 1 2 --repeats 1 --methods clipfusion winclip "${common[@]}" | tee "$logs/gpu-smoke.log"
timeout 330 "$python" benchmarks/methods.py --out "$out" --name gpu --batch-size 1 8 32 --images 32 --repeats 3 \
    --methods clipfusion winclip "${common[@]}" "$@" | tee "$logs/gpu.log" || echo "gpu.sh: step 2 failed or timed out"
timeout 150 "$python" benchmarks/methods.py --out "$out" --name gpu-compiled --methods clipfusion clipfusion-compiled \
    --presets fast --shots 0 --batch-size 1 8 --images 16 --repeats 2 "${common[@]}" | tee "$logs/gpu-compiled.log" \
    || echo "gpu.sh: step 3 failed or timed out"
