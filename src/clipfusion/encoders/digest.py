"""A digest of a model's weights that does not depend on the precision it was loaded in.

SHA-256 over every state-dict entry, in name order: its name, its shape, and its values rounded to
bfloat16 (integers as they are).  Rounding float32 to bfloat16 is exact and deterministic, and a model
loaded in bfloat16 holds the very same rounded values, so one weight file gives one digest whether it
runs in float32 or bfloat16, and a different file (another checkpoint, a retrained or damaged one) a
different digest.  Hashing the parameters rather than files covers weights from the hub cache, local
folders and the tiny random models alike.

A digest is kept with its module until a weight changes: the self-check and the precompiled parts'
keys both ask for the UNet's at a start, and hashing it takes seconds (5 s for 3.4 GB of float32).
"""
from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

# module → (each state-dict tensor as (name, weak reference, version counter, storage address), its digest)
_State = tuple[tuple[str, "weakref.ref[torch.Tensor]", int, int], ...]
_digests: weakref.WeakKeyDictionary[nn.Module, tuple[_State, str]] = weakref.WeakKeyDictionary()


def weights_digest(module: nn.Module) -> str:
    """The hex SHA-256 of ``module``'s weights (see the module's docstring); two rounded tensors held at a time.

    The digest of an earlier call is returned while every tensor is the same object with the same version
    counter (an in-place write, ``load_state_dict`` included, moves it) and the same storage (``.data =``
    swaps it without moving the counter); a module holding tensors made under ``torch.inference_mode`` (no
    version counter) is hashed at every call."""
    state = _state(module)
    kept = _digests.get(module)
    if state is not None and kept is not None and _same(kept[0], state):
        return kept[1]
    digest = hashlib.sha256()
    entries = sorted(module.state_dict().items())
    for (name, _), values in zip(entries, _rounded_ahead(tensor for _, tensor in entries), strict=True):
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype};".encode())
        digest.update(values.numpy().data)  # hashed in place: a bytes copy of each cost as much as the hashing
    if state is not None:
        _digests[module] = (state, digest.hexdigest())
    return digest.hexdigest()


def _rounded_ahead(tensors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each tensor as it is hashed, the next one rounded in a second thread while the caller hashes this one
    (both release the GIL; ``benchmarks/digest.py``).  One ahead at most, so that no more than two rounded
    copies are held."""
    with ThreadPoolExecutor(max_workers=1) as rounding:
        upcoming: Future[torch.Tensor] | None = None
        for tensor in tensors:
            submitted = rounding.submit(_hashed_values, tensor)
            if upcoming is not None:
                yield upcoming.result()
            upcoming = submitted
        if upcoming is not None:
            yield upcoming.result()


def _hashed_values(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as it is hashed: on the CPU, contiguous, floating point rounded to bfloat16 and seen as int16."""
    values = tensor.detach().to("cpu")
    if values.is_floating_point():
        values = values.to(torch.bfloat16).view(torch.int16)
    return values.contiguous()


def _state(module: nn.Module) -> _State | None:
    """What a kept digest was taken of; None where a tensor has no version counter to tell a change by."""
    tensors = sorted(module.state_dict(keep_vars=True).items())
    if any(tensor.is_inference() for _, tensor in tensors):
        return None
    return tuple((name, weakref.ref(tensor), tensor._version, tensor.data_ptr()) for name, tensor in tensors)


def _same(kept: _State, now: _State) -> bool:
    return len(kept) == len(now) and all(
        name == name_now and ref() is not None and ref() is ref_now() and version == version_now and where == where_now
        for (name, ref, version, where), (name_now, ref_now, version_now, where_now) in zip(kept, now, strict=True))
