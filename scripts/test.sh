#!/usr/bin/env bash
# README command 2 (and CI): set up .venv if needed, then run the whole test suite.
# pytest exits non-zero when a test fails and 5 when no test ran; both fail this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
