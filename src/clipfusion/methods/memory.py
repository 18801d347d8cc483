"""Few-shot memory banks: normal reference features per branch and layer, nearest-neighbour distance.

A bank holds, per named layer, every position of the k reference images' features, L2-normalised
and flattened to (M, C).  The distance of a query feature is ``min over the bank of ½(1 − cos)``,
in [0, 1], found by chunked matrix products so memory stays bounded (4 shots of 64×64 features
are 16k rows).  Banks save as safetensors with a JSON manifest; loading one made with other
settings is refused with the mismatching fields named.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from clipfusion import __version__
from clipfusion.errors import ClipfusionError, MemoryBankMismatchError
from clipfusion.outputs import write_atomic

QUERY_CHUNK = 4096
MEMORY_CHUNK = 8192


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor, neighbours: int = 1) -> torch.Tensor:
    """(Q, C) and (M, C), both L2-normalised → (Q,) mean over the ``neighbours`` nearest memory rows of
    ½(1 − cos), in [0, 1] (with 1: the min).  More neighbours than rows uses every row.

    Works in blocks of QUERY_CHUNK × MEMORY_CHUNK similarities (128 MB in float32 at most), keeping a
    running top-k of similarities per query.
    """
    memory = memory.to(device=queries.device, dtype=queries.dtype)
    k = min(neighbours, memory.shape[0])
    best = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
    for q0 in range(0, queries.shape[0], QUERY_CHUNK):
        block = queries[q0:q0 + QUERY_CHUNK]
        top = torch.full((block.shape[0], k), -1.0, device=queries.device, dtype=torch.float32)
        for m0 in range(0, memory.shape[0], MEMORY_CHUNK):
            similarities = (block @ memory[m0:m0 + MEMORY_CHUNK].T).float()
            if k == 1:  # the common case, without a sort
                top = torch.maximum(top, similarities.amax(dim=1, keepdim=True))
            else:
                top = torch.cat([top, similarities], dim=1).topk(k, dim=1).values
        best[q0:q0 + QUERY_CHUNK] = top.mean(dim=1)
    return ((1.0 - best) / 2.0).clamp_(0.0, 1.0)


@dataclass
class MemoryBank:
    """features: {layer name: (M, C) L2-normalised}; manifest: how they were made (JSON-able)."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, tokens: torch.Tensor) -> None:
        """Append (..., C) features of reference images to layer ``name`` (normalised here)."""
        flat = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1).cpu()
        self.features[name] = flat if name not in self.features else torch.cat([self.features[name], flat])

    def distance(self, name: str, tokens: torch.Tensor, neighbours: int = 1) -> torch.Tensor:
        """(B, N, C) query features → (B, N) nearest-neighbour distance to layer ``name`` of the bank
        (the mean over ``neighbours`` nearest, see :func:`nearest_distance`)."""
        queries = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)
        return nearest_distance(queries, self.features[name], neighbours).reshape(tokens.shape[:-1])

    def save(self, path: str | Path) -> Path:
        """Write the bank as safetensors (no pickle) with the manifest as JSON metadata, atomically."""
        path = Path(path)
        manifest = {**self.manifest, "version": __version__}
        data = save({k: v.contiguous() for k, v in self.features.items()}, metadata={"manifest": json.dumps(manifest)})
        write_atomic(path, data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        path = Path(path)
        if not path.is_file():
            raise ClipfusionError(f"memory bank {path} not found")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                manifest = json.loads((handle.metadata() or {}).get("manifest", "{}"))
            features = load_file(str(path))
        except Exception as exc:  # a truncated or foreign file
            raise ClipfusionError(f"{path} is not a clipfusion memory bank: {exc}") from None
        if not isinstance(manifest, dict):
            raise ClipfusionError(f"{path} is not a clipfusion memory bank: its manifest is not a JSON object")
        for name, tensor in features.items():
            if tensor.ndim != 2 or tensor.shape[0] == 0:
                raise ClipfusionError(f"memory bank {path}: layer {name!r} has shape {tuple(tensor.shape)}, "
                                      "not (features, channels); refit it with `clipfusion fit`")
            if not torch.isfinite(tensor).all():
                raise ClipfusionError(f"memory bank {path}: layer {name!r} holds NaN or infinite values; refit it "
                                      "with `clipfusion fit`")
        return cls(features, manifest)

    def check_layers(self, names: list[str], source: str = "the bank") -> None:
        """Raise MemoryBankMismatchError when a layer the detector reads is missing from the bank."""
        missing = [name for name in names if name not in self.features]
        if missing:
            raise MemoryBankMismatchError(f"{source} lacks the layers {missing} (it has {sorted(self.features)}); "
                                          "refit it with `clipfusion fit`")

    def check_compatible(self, expected: dict[str, Any], source: str = "the bank") -> None:
        """Raise MemoryBankMismatchError naming every setting in ``expected`` that the manifest contradicts."""
        wrong = [
            f"{key}: bank {self.manifest.get(key)!r} vs detector {value!r}"
            for key, value in expected.items()
            if json.loads(json.dumps(self.manifest.get(key))) != json.loads(json.dumps(value))
        ]
        if wrong:
            raise MemoryBankMismatchError(
                f"{source} was made with other settings ({'; '.join(wrong)}); refit it with `clipfusion fit` "
                "or use a detector with the bank's settings"
            )
