"""How long the weights' digest takes: what the self-check, the text cache and the precompiled parts' keys pay
at a start of ``serve`` or ``watch``.

``fast``'s UNet and CLIP (random weights, full size, float32, as clipfusion loads them) are hashed each way in
turn, interleaved rounds, after one warm-up round:

- ``serial``: one tensor at a time, rounded to bfloat16, copied to bytes, then hashed (clipfusion before);
- ``pipelined``: ``encoders.digest.weights_digest``, the next tensor rounded in a second thread while this one
  is hashed in place (its kept digest forgotten before every call).

Both must give the same digest (checked: the script stops otherwise).

Usage: python benchmarks/digest.py [--rounds 3] [--out benchmarks/results/digest.json]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import interleaved_median_ms, write_results
from torch import nn

from clipfusion.config import RuntimeConfig
from clipfusion.encoders import cache
from clipfusion.encoders import digest as digest_module
from clipfusion.tasks.benchmark import random_weight_preset


def serial_digest(module: nn.Module) -> str:
    """The digest as clipfusion computed it before: one tensor at a time, through a bytes copy."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        values = tensor.detach().to("cpu")
        if values.is_floating_point():
            values = values.to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype};".encode())
        digest.update(values.contiguous().numpy().tobytes())
    return digest.hexdigest()


def pipelined_digest(module: nn.Module) -> str:
    digest_module._digests.pop(module, None)  # hashed anew, not the kept digest
    return digest_module.weights_digest(module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/digest.json")
    args = parser.parse_args()
    preset, runtime = random_weight_preset("fast"), RuntimeConfig("cpu", "float32")
    modules = {"unet": cache.diffusion_encoder(preset.diffusion, runtime).unet,
               "clip": cache.clip_encoder(preset.clip, runtime).model}
    runs = []
    for name, module in modules.items():
        if serial_digest(module) != pipelined_digest(module):
            raise SystemExit(f"{name}: the two ways give different digests")
        times = interleaved_median_ms({"serial": functools.partial(serial_digest, module),
                                       "pipelined": functools.partial(pipelined_digest, module)}, args.rounds)
        megabytes = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 1e6
        row = {"module": name, "weights_mb": round(megabytes), "serial_ms": times["serial"],
               "pipelined_ms": times["pipelined"], "speedup": round(times["serial"] / times["pipelined"], 2),
               "same_digest": True}
        print(row, flush=True)
        runs.append(row)
    write_results(args.out, runs, rounds=args.rounds, figure="median of the rounds, each way in turn per round",
                  command=" ".join(["python", "benchmarks/digest.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
