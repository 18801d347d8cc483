"""Helpers shared by the benchmark scripts: one subprocess per measurement, one results file."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def run_isolated(script: str, args: list[str]) -> dict:
    """Run ``script --one ...`` in a fresh interpreter (so its peak RSS is its own); its last line is JSON."""
    output = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    return result


def write_results(path: str, runs: list[dict], **extra: object) -> None:
    import torch

    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "processor": platform.processor() or platform.machine()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"runs": runs, **extra, "machine": machine}, indent=2) + "\n")
