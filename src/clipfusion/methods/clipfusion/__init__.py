"""CLIPFusion: PatchCLIP (CLIP) and MapDiff (Stable Diffusion) branches, their fusion, and the detector."""
