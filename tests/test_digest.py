"""The weights' digest: SHA-256 of names, shapes and bfloat16-rounded values, kept until a weight changes."""
from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest
import torch
from torch import nn

from clipfusion.encoders import digest as digest_module
from clipfusion.encoders.digest import weights_digest


def _expected(named: dict[str, np.ndarray]) -> str:
    """The digest computed with numpy alone: float32 rounded to bfloat16 by hand (nearest, ties to even)."""
    sha = hashlib.sha256()
    for name, values in sorted(named.items()):
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).view(np.int16)
        sha.update(f"{name}:{tuple(values.shape)}:torch.int16;".encode())
        sha.update(rounded.tobytes())
    return sha.hexdigest()


def _layer(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per digest computed from the tensors (``hashlib.sha256`` as the module calls it)."""
    calls: list[int] = []
    sha256 = hashlib.sha256

    def counting() -> hashlib._Hash:
        calls.append(1)
        return sha256()

    monkeypatch.setattr(digest_module, "hashlib", types.SimpleNamespace(sha256=counting))
    return calls


def test_the_digest_is_the_sha256_of_rounded_values_the_same_in_float32_and_bfloat16():
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    layer = _layer(weight, bias)
    assert weights_digest(layer) == _expected({"weight": weight, "bias": bias})
    assert weights_digest(_layer(weight, bias).to(torch.bfloat16)) == weights_digest(layer)
    weight[0, 0] += 0.5
    assert weights_digest(_layer(weight, bias)) != weights_digest(layer)


def test_a_digest_is_kept_until_a_weight_is_written_or_replaced(hashed):
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    layer = _layer(weight, bias)
    first = weights_digest(layer)
    assert weights_digest(layer) == first and len(hashed) == 1  # the second call hashed nothing
    with torch.no_grad():
        layer.weight.add_(1.0)  # in place
    assert weights_digest(layer) == _expected({"weight": weight + 1.0, "bias": bias}) and len(hashed) == 2
    layer.load_state_dict({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)})
    assert weights_digest(layer) == first and len(hashed) == 3
    layer.bias = nn.Parameter(torch.from_numpy(bias * 2))  # replaced by another tensor
    assert weights_digest(layer) == _expected({"weight": weight, "bias": bias * 2}) and len(hashed) == 4
    version = layer.weight._version
    layer.weight.data = torch.from_numpy(weight * 3)  # other values swapped in: the version counter stays
    assert layer.weight._version == version
    assert weights_digest(layer) == _expected({"weight": weight * 3, "bias": bias * 2}) and len(hashed) == 5


def test_weights_without_a_version_counter_are_hashed_at_every_call(hashed):
    rng = np.random.default_rng(2)
    weight, bias = rng.normal(size=(2, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    with torch.inference_mode():  # a model loaded under inference mode: in-place writes leave no trace
        layer = _layer(weight, bias)
        weights_digest(layer)
        layer.weight.mul_(3.0)
        assert weights_digest(layer) == _expected({"weight": weight * 3.0, "bias": bias})
    assert len(hashed) == 2
