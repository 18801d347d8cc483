#!/usr/bin/env bash
# README command 1: set up .venv if needed, then run the main job on the bundled synthetic data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/clipfusion demo "$@"
