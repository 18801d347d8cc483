"""Running the installed ``clipfusion`` command in a subprocess, as a user does."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def clipfusion(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    script = Path(sys.executable).with_name("clipfusion")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clipfusion"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})


def results(out: Path) -> list[dict]:
    """The rows of a predict run's results.jsonl, parsed strictly (NaN refused, non-UTF-8 names kept)."""
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} in results.jsonl")

    text = (out / "results.jsonl").read_bytes().decode("utf-8", "surrogateescape")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def clipfusion_here(*args: str) -> subprocess.CompletedProcess:
    """The same command run in this process (``clipfusion.cli.main``): no interpreter and torch start-up,
    for the many cases whose subject is an error message or a file, not the process boundary."""
    from clipfusion.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["clipfusion", *args], code, out.getvalue(), err.getvalue())


def rows_so_far(out: Path) -> list[dict]:
    """The rows a running ``watch`` has written to ``out`` so far (none before its first)."""
    return results(out) if (out / "results.jsonl").is_file() else []


def wait_for(condition: Callable[[], object], limit: float = 120) -> None:
    """Poll ``condition`` every 0.1 s until it holds; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
