"""Convolution weights packed for oneDNN once, in eager mode on a CPU.

Eager PyTorch re-lays a convolution's weight out into oneDNN's blocked format at every call.  At
batch 1 on small maps (``fast``'s UNet runs 1280-channel 3×3 convolutions on 4×4 and 8×8 latents)
that costs as much as the arithmetic.  Inductor's weight freezing (``--compile``) packs the weights
once, after minutes of compiling; this packs them in eager mode with the same oneDNN operators of
torch that inductor's frozen graphs call (``mkldnn._reorder_convolution_weight`` and
``mkldnn._convolution_pointwise``), at no compile time.  Measured in ``benchmarks/compile.py``.

The packed weight is a second copy of each convolution's weight, made at its first call, packed
for one image of that call's shape and used for every batch size; a call with another image shape
(or a changed weight) packs again.  One copy per convolution is kept; :func:`convolutions_unpacked`
releases them for work that needs the memory more than the speed.
"""
from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

import torch
from torch import nn


class PrepackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose float32 inference calls on a CPU reuse a weight packed for oneDNN once.

    Made by :func:`prepack_convolutions` from a plain ``nn.Conv2d`` (same parameters and state dict).
    Every other call (autograd, another device or dtype, tracing for an export, compiling) runs
    ``nn.Conv2d``'s own forward, so graphs that are traced or compiled see a plain convolution.
    """

    _packed: tuple[tuple[object, ...], torch.Tensor] | None = None  # (what it was packed for, packed weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._packable(input):
            return super().forward(input)
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        # the weight's version counter changes with every in-place write (load_state_dict, copy_); a weight
        # made under torch.inference_mode has none, and is taken as unchanged while its storage is
        version = -1 if self.weight.is_inference() else self.weight._version
        key = (tuple(input.shape[1:]), self.weight.data_ptr(), version)
        if self._packed is None or self._packed[0] != key:
            # Packed for one image whatever the batch: repacking at every change of batch size (serve's
            # batches vary, a run's last batch is short) cost more than eager's own re-layout, and the fast
            # UNet pass at batch 8 with weights packed for one image was still 1.17x plain eager's speed.
            # Straight from the dense weight, channels-last as the loader leaves it: going through
            # to_mkldnn() first (a contiguous copy, then oneDNN's own) made packing fast's UNet 3x slower, most
            # of a cold start's first call (benchmarks/packing.py).
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), padding, stride, dilation, self.groups, [1, *input.shape[1:]])
            self._packed = (key, packed)
        # channels-last in, as eager's convolution turns its output when the weight is channels-last
        return torch.ops.mkldnn._convolution_pointwise(input.contiguous(memory_format=torch.channels_last),
                                                       self._packed[1], self.bias, padding, stride, dilation,
                                                       self.groups, "none", [], "")

    def _packable(self, input: torch.Tensor) -> bool:
        # tracing and compiling first: under them nothing else here may be looked at
        return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and input.device.type == "cpu" and input.dtype == self.weight.dtype == torch.float32
                and input.dim() == 4
                and not (torch.is_grad_enabled() and (self.weight.requires_grad or input.requires_grad)))


def prepack_convolutions(module: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` in ``module`` with zero padding given in numbers into a
    :class:`PrepackedConv2d`, in place; the number turned.  Nothing is packed until a call.  Only on
    x86 CPUs with oneDNN, where it was measured; elsewhere none is turned.  ``CLIPFUSION_PREPACK=0``
    in the environment turns none, for machines short of memory (the packed copies of ``fast``'s UNet
    take 2.2 GB in float32)."""
    if (os.environ.get("CLIPFUSION_PREPACK", "1") == "0" or not torch.backends.mkldnn.is_available()
            or platform.machine().lower() not in {"x86_64", "amd64"}):
        return 0
    turned = 0
    for child in module.modules():
        if type(child) is nn.Conv2d and child.padding_mode == "zeros" and not isinstance(child.padding, str):
            child.__class__ = PrepackedConv2d
            turned += 1
    return turned


@contextlib.contextmanager
def convolutions_unpacked(module: nn.Module) -> Iterator[None]:
    """Within: ``module``'s packed convolutions run as plain ``nn.Conv2d``, and the packed copies they held
    are released.  For work that runs a model a few times and needs the memory more than the speed: an
    export holds a copy of the weights of its own while converting (the copies of ``paper-recon``'s UNet
    are 2.2 GB in float32).  Turned back after; each packs again at its next call."""
    turned: list[nn.Module] = [child for child in module.modules() if type(child) is PrepackedConv2d]
    for child in turned:
        child.__dict__.pop("_packed", None)
        child.__class__ = nn.Conv2d
    try:
        yield
    finally:
        for child in turned:
            child.__class__ = PrepackedConv2d
