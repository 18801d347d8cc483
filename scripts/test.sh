#!/usr/bin/env bash
# README command 2 (and CI): set up .venv if needed, check style and types, then run the whole test suite.
# pytest exits non-zero when a test fails and 5 when no test ran; both fail this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/runtime-venv.sh
# What the precision-sensitive tests meet here (they also run as the other CPU kind: CLIPFUSION_NATIVE_BF16)
echo "test: $(.venv/bin/python -c 'from clipfusion.hardware import precision_summary; print(precision_summary())')" >&2
# The browser tests drive Debian's Chromium (Playwright's own browser download needs the internet).
# The service tests start a throw-away PostgreSQL server (initdb + pg_ctl on a temporary folder); the line's
# tests a mosquitto broker on a loopback port and live video streams served by ffmpeg.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]} for the browser, database and line tests" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "test: ruff" >&2
.venv/bin/python -m ruff check src tests benchmarks scripts
echo "test: mypy" >&2
.venv/bin/python -m mypy
# The suite takes 15-25 minutes; a run that has not ended in an hour hangs: end it with an answer, well inside CI's
# 90 minutes (tests/conftest.py names a leftover non-daemon thread that would keep the process from exiting).
exec timeout --kill-after=30 3600 .venv/bin/python -m pytest "$@"
