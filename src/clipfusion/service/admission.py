"""Admitting work by memory: the pixels a request will decode are counted from the images' headers and
held against a budget for the whole inspection (decoded pixels, maps at the image's size, overlays);
a request that does not fit now is answered 503 with ``Retry-After`` before any pixel is decoded.

Measured (``benchmarks/serve_memory.py``, ``benchmarks/results/serve_memory.json``): at the peak of an
image's inspection about 40 bytes per pixel are allocated up to 4 megapixels (its map, mask and regions at
its own size, then its overlay, drawn at most 2048 px long) and about 21 above, besides the decoded image
(3 bytes a pixel) and the allocator's slack: count 45 bytes a pixel of budget (25 for large frames).  A
host that can spare N GB for images can set ``--pixel-budget`` to about 20·N megapixels (docs/service.md).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from clipfusion.service.errors import ServiceError


class PixelBudget:
    """At most ``limit`` pixels held at once, over every request and model of the service."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` for the block; 413 when they could never fit, 503 when they do not fit now."""
        if pixels > self.limit:
            raise ServiceError(413, "over_pixel_budget", f"the request's images hold {pixels / 1e6:.1f} megapixels, "
                                                         f"more than the service's --pixel-budget of "
                                                         f"{self.limit / 1e6:.0f}; send fewer images per request")
        with self._lock:
            if self.held + pixels > self.limit:
                raise ServiceError(503, "busy", f"the service is inspecting {self.held / 1e6:.0f} megapixels, near its "
                                                f"--pixel-budget of {self.limit / 1e6:.0f}; retry shortly",
                                   headers={"Retry-After": "1"})
            self.held += pixels
        try:
            yield
        finally:
            with self._lock:
                self.held -= pixels
