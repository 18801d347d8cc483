"""Per-stage wall-clock time, for benchmarks: what a detector spent on CLIP, the VAE, the UNet..."""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Seconds per named stage, summed over calls.  CUDA is synchronised at both ends of a stage so
    that asynchronous GPU work is charged to the stage that launched it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @staticmethod
    def _sync() -> None:
        torch = sys.modules.get("torch")  # not imported by the exported runtime, which has no CUDA work
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()
