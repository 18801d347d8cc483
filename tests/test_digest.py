"""The weights' digest: SHA-256 of names, shapes and bfloat16-rounded values, kept until a weight changes."""
from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest
import torch
from torch import nn

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.encoders import cache
from clipfusion.encoders import digest as digest_module
from clipfusion.encoders.digest import weights_digest


def _expected(named: dict[str, np.ndarray]) -> str:
    """The digest computed with numpy alone: float32 rounded to bfloat16 by hand (nearest, ties to even),
    integers as they are."""
    sha = hashlib.sha256()
    for name, values in sorted(named.items()):
        if values.dtype.kind == "i":
            sha.update(f"{name}:{tuple(values.shape)}:torch.{values.dtype};".encode())
            sha.update(np.ascontiguousarray(values).tobytes())
            continue
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


def test_many_tensors_of_mixed_kinds_are_hashed_in_name_order():
    """The tensors are rounded one ahead in a second thread: each must still be hashed once, in name order."""
    rng = np.random.default_rng(3)
    model = nn.Sequential(*(nn.Linear(width, width + 1) for width in range(1, 12)))
    model.register_buffer("steps", torch.arange(7, dtype=torch.int64).reshape(7, 1))
    model.register_buffer("empty", torch.zeros(0))
    model.register_buffer("scale", torch.tensor(2.5))  # no dimension, like CLIP's logit scale
    expected = {"steps": np.arange(7, dtype=np.int64).reshape(7, 1), "empty": np.zeros(0, dtype=np.float32),
                "scale": np.array(2.5, dtype=np.float32)}
    with torch.no_grad():
        for index, layer in enumerate(model):
            for name in ("weight", "bias"):
                values = rng.normal(size=tuple(getattr(layer, name).shape)).astype(np.float32)
                getattr(layer, name).copy_(torch.from_numpy(values))
                expected[f"{index}.{name}"] = values
    assert weights_digest(model) == _expected(expected)


def test_encoders_loaded_inside_inference_mode_hold_ordinary_tensors_and_keep_their_digest(hashed):
    """A detector loads its encoders at its first predict, inside torch.inference_mode: made there, the weights
    had no version counter, and the digest asked for at every start (text cache, self-check, precompiled keys)
    was hashed again at every call."""
    preset, runtime = get_preset("tiny"), RuntimeConfig("cpu", "float32")
    cache.release()  # loaded anew here, whatever an earlier test loaded
    with torch.inference_mode():
        modules = [cache.clip_encoder(preset.clip, runtime).model,
                   cache.diffusion_encoder(preset.diffusion, runtime).unet]
        for module in modules:
            assert not any(tensor.is_inference() for tensor in module.state_dict(keep_vars=True).values())
            assert weights_digest(module) == weights_digest(module)
    assert len(hashed) == 2  # one digest per model, the second call of each kept
