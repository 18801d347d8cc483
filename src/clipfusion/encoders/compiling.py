"""``torch.compile`` for inference (``RuntimeConfig.compile``): inductor with the weights frozen in as
constants, and static shapes.

Freezing lets inductor pack the convolution and linear weights for oneDNN once, at compile time,
instead of at every call.  That is where the speed-up on a CPU comes from; compiling without it gave
1.05× on the UNet (docs/speed.md).  Shapes are static, so callers feed one image per call: one compile
per model part, not one per batch size (serve's batches vary, a run's last batch is short).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

Function = TypeVar("Function", bound=Callable[..., Any])


def compile_for_inference(function: Function) -> Function:
    """``function`` compiled lazily (at its first call) with frozen weights and static shapes."""
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
