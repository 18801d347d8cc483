"""CLIP's text embeddings of a prompt list, kept on disk per model and machine.

A start of ``fast`` encodes its category's 242 state prompts with CLIP's text tower: 3–5 s of its
cold start on a 2-core CPU, all arithmetic (about 0.5 TFLOP).  What comes out depends only on the
text tower's weights, the tokens, the precision, the code that runs it and the machine, so the first
run on a machine writes it to a file named by a digest of all of these, and every later start reads it
back instead (``benchmarks/cold_start.py``).

Files live in ``$CLIPFUSION_TEXT_CACHE``, else ``$XDG_CACHE_HOME/clipfusion/text``
(``~/.cache/clipfusion/text``); ``CLIPFUSION_TEXT_CACHE=off`` keeps none.  A changed weight, prompt,
dtype, torch version, CPU instruction set or line of ``clip.py`` looks for another file, so a stale one is
never read; a file that cannot be read or does not hold what its name promises is computed again and
replaced; a folder that cannot be written costs the speed-up, never the run.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from clipfusion.config import user_cache_dir
from clipfusion.encoders.digest import weights_digest
from clipfusion.hardware import cpu_info
from clipfusion.outputs import write_atomic

logger = logging.getLogger("clipfusion")

TEXT_CACHE_ENV = "CLIPFUSION_TEXT_CACHE"
NAME = "embeddings"  # the one tensor a file holds: (N, D), the text tower's output in the model's dtype


def cache_folder() -> Path | None:
    """``$CLIPFUSION_TEXT_CACHE`` (``off``: None), else ``$XDG_CACHE_HOME/clipfusion/text``."""
    chosen = os.environ.get(TEXT_CACHE_ENV)
    if chosen:
        return None if chosen.lower() in {"off", "0", "none"} else Path(chosen)
    return user_cache_dir("text")


@functools.cache
def _code_digest() -> str:
    return hashlib.sha256(Path(__file__).with_name("clip.py").read_bytes()).hexdigest()


def key_fields(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, object]:
    """Everything the embeddings of ``tokens`` (N, L) depend on; a file's name is their digest."""
    parameter = next(model.parameters())
    return {"weights": weights_digest(model), "dtype": str(parameter.dtype).removeprefix("torch."),
            "tokens": hashlib.sha256(tokens.to("cpu", torch.int64).numpy().tobytes()).hexdigest(),
            "shape": list(tokens.shape), "torch": torch.__version__, "device": parameter.device.type,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": list(cpu_info().flags),
            "code": _code_digest()}


def cached_text_embeddings(model: torch.nn.Module, tokens: torch.Tensor,
                           compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """(N, D) ``compute()``'s text embeddings of ``tokens`` (N, L), read from the cache where a run on this
    machine wrote them before, else computed and written there."""
    folder = cache_folder()
    if folder is None:
        return compute()
    fields = key_fields(model, tokens)
    text = json.dumps(fields, sort_keys=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors"
    kept = _read(path, text, len(tokens))
    if kept is not None:
        return kept.to(tokens.device)
    embeddings = compute()
    _write(path, text, embeddings)
    return embeddings


def _read(path: Path, fields: str, rows: int) -> torch.Tensor | None:
    """The file's embeddings where it holds those of ``fields`` (all finite, ``rows`` of them), else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as stored:
            if (stored.metadata() or {}).get("fields") != fields:
                raise ValueError("made for other weights, prompts or machine")
            embeddings = stored.get_tensor(NAME)
        if embeddings.dim() != 2 or embeddings.shape[0] != rows or not torch.isfinite(embeddings).all():
            raise ValueError(f"holds {tuple(embeddings.shape)} values, not {rows} finite rows")
    except Exception as exc:  # broad on purpose: any damage means computing them again, never a lost run
        logger.debug("text cache: %s unusable (%s); computing the embeddings again", path, exc)
        return None
    return embeddings


def _write(path: Path, fields: str, embeddings: torch.Tensor) -> None:
    from safetensors.torch import save

    try:
        write_atomic(path, save({NAME: embeddings.detach().to("cpu").contiguous()}, metadata={"fields": fields}))
    except OSError as exc:
        logger.debug("text cache: cannot write %s (%s); the next start encodes the prompts again", path, exc)
