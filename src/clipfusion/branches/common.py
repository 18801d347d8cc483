"""Small pieces both branches and WinCLIP use."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def state_probability(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., D) normalised embeddings, (2, D) [normal, anomalous] prototypes → (...) P(anomalous).

    The two-way softmax of cosine similarities at ``temperature`` (CLIP's 0.07 = logit scale 100).
    """
    logits = embeddings.float() @ prototypes.T.float() / temperature
    return logits.softmax(dim=-1)[..., 1]


def resize_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) → (B, H, W), bilinear, align_corners=False."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
