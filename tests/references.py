"""Slow, straightforward recomputations that tests compare the fast code with (written apart from it)."""
from __future__ import annotations

import torch

from clipfusion.encoders.clip import ClipEncoder


def slow_window_map(encoder: ClipEncoder, pixels: torch.Tensor, prototypes: torch.Tensor, image_score: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """(B, h*w) WinCLIP zero-shot map, one window at a time through open_clip's own modules."""
    out = encoder.encode_image(pixels, dense=False)
    visual = encoder.model.visual
    h, w = encoder.grid_size
    with torch.inference_mode():
        sequence = encoder.token_embeddings(pixels)  # checked against open_clip's own pooling below
        pooled = visual.ln_post(visual.transformer(sequence)[:, 0]) @ visual.proj
        torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), out.global_embedding)
        slow = torch.zeros(len(pixels), h * w)
        for b in range(len(pixels)):
            scale_maps = []
            for k in (2, 3):
                covering: dict[int, list[float]] = {p: [] for p in range(h * w)}
                for top in range(h - k + 1):
                    for left in range(w - k + 1):
                        patches = [(top + r) * w + left + c for r in range(k) for c in range(k)]
                        tokens = sequence[b:b + 1, [0] + [p + 1 for p in patches]]
                        embedded = torch.nn.functional.normalize(
                            visual.ln_post(visual.transformer(tokens)[:, 0]) @ visual.proj, dim=-1)
                        score = (embedded @ prototypes.T / temperature).softmax(-1)[0, 1].item()
                        for p in patches:
                            covering[p].append(score)
                scale_maps.append([len(v) / sum(1 / s for s in v) for v in covering.values()])
            for p in range(h * w):
                terms = [image_score[b].item(), scale_maps[0][p], scale_maps[1][p]]
                slow[b, p] = 3 / sum(1 / t for t in terms)
    return slow
