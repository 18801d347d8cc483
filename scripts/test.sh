#!/usr/bin/env bash
# README command 2 (and CI): set up .venv if needed, check style and types, then run the whole test suite.
# pytest exits non-zero when a test fails and 5 when no test ran; both fail this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests drive Debian's Chromium (Playwright's own browser download needs the internet).
if [ ! -x /usr/bin/chromium ]; then
  echo "test: installing chromium for the browser tests" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "test: ruff" >&2
.venv/bin/python -m ruff check src tests benchmarks scripts
echo "test: mypy" >&2
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
