"""A digest of a model's weights that does not depend on the precision it was loaded in.

SHA-256 over every state-dict entry, in name order: its name, its shape, and its values rounded to
bfloat16 (integers as they are).  Rounding float32 to bfloat16 is exact and deterministic, and a model
loaded in bfloat16 holds the very same rounded values, so one weight file gives one digest whether it
runs in float32 or bfloat16, and a different file (another checkpoint, a retrained or damaged one) a
different digest.  Hashing the parameters rather than files covers weights from the hub cache, local
folders and the tiny random models alike.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_digest(module: nn.Module) -> str:
    """The hex SHA-256 of ``module``'s weights (see the module's docstring); one tensor copied at a time."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        values = tensor.detach().to("cpu")
        if values.is_floating_point():
            values = values.to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype};".encode())
        digest.update(values.contiguous().numpy().tobytes())
    return digest.hexdigest()
