#!/usr/bin/env bash
# Create .venv and install clipfusion into it (idempotent: reinstalls only when the project files change).
# torch is pinned here, not in pyproject.toml: torch 2.14.1 + torchvision 0.29.1 is the pair that imports
# together on the project's reference machines. Set TORCH_SPEC to your own pair (e.g. a CUDA/ROCm build),
# or TORCH_SPEC=none to keep the torch already in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.clipfusion-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$(echo "$TORCH_SPEC" | sha256sum | cut -c1-8)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  if [ "$TORCH_SPEC" != "none" ]; then
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install --quiet $TORCH_SPEC
  fi
  .venv/bin/python -m pip install --quiet -e ".[models,export,serve,ray,line,dev]"
  echo "$want" > "$stamp"
fi
