"""The three graphs of an export, as torch modules that call the detector's own code.

Each runs one image (batch 1: static shapes, so Python loops over chunks and layers trace into a
fixed graph) and ends in branch maps, so the runtime only resizes and fuses:

- ``clip``: normalised pixels (1, 3, S, S) → ``clip_score`` (1,), ``clip_language`` (1, h, w) and, fitted,
  ``clip_visual`` (1, h, w).  The category's text prototypes and the CLIP memory bank are constants.
- ``vae``: pixels in [−1, 1] (1, 3, s, s) → latents z0 (1, 4, s/8, s/8).
- ``diffusion``: latents (1, 4, s/8, s/8) → ``diff_language`` (1, s/8, s/8) and, fitted, ``diff_visual``.
  The noise (the fixed seeded draw), the timestep, the UNet context of the state prompts and the
  diffusion memory bank are constants; the UNet runs :func:`partial_unet_forward` up to the last block
  the maps need and no further.
"""
from __future__ import annotations

import torch

from clipfusion.methods.clipfusion.detector import CLIPFusion


class ClipGraph(torch.nn.Module):
    def __init__(self, detector: CLIPFusion, category: str) -> None:
        super().__init__()
        self.detector, self.category = detector, category
        patchclip, _ = detector._branches()
        self.model = patchclip.encoder.model  # registered, so tracing takes its weights as parameters
        self.prototypes = patchclip.prototypes(category).clone()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        patchclip, _ = self.detector._branches()
        out = patchclip.run_pixels(pixels, self.prototypes)
        maps = [out.image_score, out.language_map]
        if hasattr(self.detector, "memory_bank_"):
            maps.append(patchclip.visual_map(out.visual_tokens, self.detector.memory_bank_,
                                             self.detector.config.memory.neighbours))
        return tuple(m.float() for m in maps)


class VaeGraph(torch.nn.Module):
    def __init__(self, detector: CLIPFusion) -> None:
        super().__init__()
        self.detector = detector
        self.vae = detector._branches()[1].encoder.vae

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        _, mapdiff = self.detector._branches()
        return mapdiff.encoder.encode_latents(pixels)


class DiffusionGraph(torch.nn.Module):
    def __init__(self, detector: CLIPFusion, category: str) -> None:
        super().__init__()
        self.detector, self.category = detector, category
        self.unet = detector._branches()[1].encoder.unet

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, mapdiff = self.detector._branches()
        fitted = hasattr(self.detector, "memory_bank_")
        out = mapdiff.run_latents(latents, self.category, with_features=fitted)
        maps = [out.language_map]
        if fitted:
            maps.append(mapdiff.visual_map(out.features, self.detector.memory_bank_,
                                           self.detector.config.memory.neighbours))
        return tuple(m.float() for m in maps)
