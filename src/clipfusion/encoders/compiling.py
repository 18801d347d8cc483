"""``torch.compile`` for inference (``RuntimeConfig.compile``): inductor with the weights frozen in as
constants, and static shapes.

Freezing lets inductor pack the convolution and linear weights for oneDNN once, at compile time,
instead of at every call.  That is where the speed-up on a CPU comes from; compiling without it gave
1.05× on the UNet (docs/speed.md).  Shapes are static, so callers feed one image per call: one compile
per model part, not one per batch size (serve's batches vary, a run's last batch is short).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

Function = TypeVar("Function", bound=Callable[..., Any])

# torch's loggers that write to the terminal while compiling or loading compiled code: dynamo's multi-line
# notes (e.g. on the functools.lru_cache of diffusers' upsampling), inductor's, and "No CUDA runtime is
# found" from C++ extension building on a CPU-only machine
COMPILER_LOGGERS = ("torch._dynamo", "torch._inductor", "torch._export", "torch.export", "torch.fx",
                    "torch.utils.cpp_extension")


class _ToClipfusionDebug(logging.Handler):
    """Hands a record of torch's compiler on to clipfusion's log at debug level (shown with ``--debug``)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("clipfusion").debug("%s: %s", record.name, record.getMessage())


@functools.cache
def route_compiler_logs() -> None:
    """Send the compiler's warnings to clipfusion's log at debug level instead of the user's terminal (once)."""
    handler = _ToClipfusionDebug()
    for name in COMPILER_LOGGERS:
        compiler_logger = logging.getLogger(name)
        compiler_logger.handlers[:] = [handler]
        compiler_logger.propagate = False


def compile_for_inference(function: Function) -> Function:
    """``function`` compiled lazily (at its first call) with frozen weights and static shapes."""
    route_compiler_logs()
    compiled = torch.compile(function, dynamic=False)

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        # Set for the whole call, not through torch.compile(options=...): dynamo decides while tracing
        # whether parameters become constants, and options reach inductor only after that (measured:
        # options={"freezing": True} left the UNet pass as slow as eager).
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return cast(Function, run)


def one_image_per_call(tensor: torch.Tensor, compiled: bool, rows_per_image: int = 1) -> tuple[torch.Tensor, ...]:
    """``tensor``'s rows in the chunks a call takes: all at once, or, compiled, one image's rows at a time."""
    return tensor.split(rows_per_image) if compiled else (tensor,)
