"""Running the installed ``clipfusion`` command in a subprocess, as a user does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def clipfusion(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    script = Path(sys.executable).with_name("clipfusion")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "clipfusion"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})

