#!/usr/bin/env bash
# Create .venv-runtime: clipfusion with only the torch-free runtime of exported models
# (pip install -e ".[runtime]": OpenVINO Runtime, NumPy, Pillow, SciPy...; no torch).  The tests run
# `clipfusion predict --model EXPORT/` in it to prove the runtime path never imports torch.
# Idempotent: reinstalls only when the project files change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-runtime/bin/python ]; then
  echo "runtime-venv: creating .venv-runtime with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv-runtime
fi
stamp=.venv-runtime/.clipfusion-setup
want=$(cat pyproject.toml scripts/runtime-venv.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "runtime-venv: installing clipfusion[runtime] into .venv-runtime (no torch)" >&2
  .venv-runtime/bin/python -m pip install --quiet --upgrade pip
  .venv-runtime/bin/python -m pip install --quiet -e ".[runtime]"
  if .venv-runtime/bin/python -c "import torch" 2>/dev/null; then
    echo "runtime-venv: torch got into .venv-runtime; the runtime must not need it" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
