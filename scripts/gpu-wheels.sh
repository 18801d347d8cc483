#!/usr/bin/env bash
# Wheels of the model packages that the lent GPU machine lacks (it has Python 3.12 and torch), into .whl/
# (ignored by git), at the versions of this checkout's .venv: carry .whl there and run benchmarks/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
packages=()
for name in diffusers open_clip_torch ftfy wcwidth importlib_metadata lazy-importer; do
    version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    packages+=("$name${version:+==$version}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${packages[@]}"
ls .whl
