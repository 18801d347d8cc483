"""How long packing a UNet's convolution weights for oneDNN takes: the time its first call pays.

``fast``'s UNet (random weights, full size, channels-last as the loader leaves it) runs once with its
convolutions as ``PrepackedConv2d``; every packing call it made (weight, padding, stride, dilation,
groups, input size) is recorded, then packed again by each way, in interleaved rounds, every round
on fresh memory (the packed copies of the round before are released):

- ``two_step``: ``weight.to_mkldnn()`` then ``torch._C._nn.mkldnn_reorder_conv2d_weight`` (what
  clipfusion did before: a contiguous copy of the channels-last weight, oneDNN's plain copy, then the
  blocked copy);
- ``one_op``: ``torch.ops.mkldnn._reorder_convolution_weight`` straight from the dense weight (what
  inductor's weight freezing calls, and clipfusion now).

Each way's packed weights give the same convolution outputs (checked on a random input per layer,
largest difference reported).  Float32.

Usage: python benchmarks/packing.py [--preset fast] [--rounds 3] [--out benchmarks/results/packing.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import write_results

from clipfusion.config import RuntimeConfig
from clipfusion.encoders import cache
from clipfusion.tasks.benchmark import random_weight_preset

Call = tuple[torch.Tensor, list[int], list[int], list[int], int, list[int]]


def two_step(weight: torch.Tensor, *options: Any) -> torch.Tensor:
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), *options)  # type: ignore[call-arg]


def one_op(weight: torch.Tensor, *options: Any) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_convolution_weight(weight, *options)


WAYS = {"two_step": two_step, "one_op": one_op}


def recorded_calls(preset: str) -> tuple[list[Call], str]:
    """Every packing call of one pass of ``preset``'s UNet as clipfusion runs it, and the UNet's layout."""
    encoder = cache.diffusion_encoder(random_weight_preset(preset).diffusion, RuntimeConfig("cpu", "float32"))
    calls: list[Call] = []
    pack = torch.ops.mkldnn._reorder_convolution_weight
    torch.ops.mkldnn._reorder_convolution_weight = lambda *args: calls.append(args) or pack(*args)
    try:
        side = encoder.latent_size
        encoder.run_unet(torch.randn(1, 4, side, side), ["a photo of a disc"], token_indices=[1])
    finally:
        torch.ops.mkldnn._reorder_convolution_weight = pack
    layout = "channels-last" if calls[0][0].is_contiguous(memory_format=torch.channels_last) else "contiguous"
    return calls, layout


def largest_difference(calls: list[Call]) -> float:
    """The largest difference between the convolution outputs of the two ways' packed weights."""
    worst = 0.0
    for weight, padding, stride, dilation, groups, size in calls:
        x = torch.randn(size).contiguous(memory_format=torch.channels_last)
        outputs = [torch.ops.mkldnn._convolution_pointwise(x, way(weight, padding, stride, dilation, groups, size),
                                                           None, padding, stride, dilation, groups, "none", [], "")
                   for way in WAYS.values()]
        worst = max(worst, float((outputs[0] - outputs[1]).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast", choices=("fast", "paper-recon"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/packing.json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    calls, layout = recorded_calls(args.preset)
    megabytes = sum(call[0].numel() * call[0].element_size() for call in calls) / 1e6
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            start = time.perf_counter()
            packed = [way(*call) for call in calls]
            seconds[name].append(time.perf_counter() - start)
            del packed  # the next way packs into fresh memory, as a first call does
    best = {name: min(times) for name, times in seconds.items()}
    row = {"preset": args.preset, "convolutions": len(calls), "weights_mb": round(megabytes), "weight_layout": layout,
           **{f"{name}_s": round(value, 2) for name, value in best.items()},
           "speedup": round(best["two_step"] / best["one_op"], 2),
           "max_output_difference": largest_difference(calls)}
    print(row)
    write_results(args.out, [row], rounds=args.rounds, figure="fastest of the rounds, each way in turn per round",
                  command=" ".join(["python", "benchmarks/packing.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
