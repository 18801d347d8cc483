"""Convolutions with weights packed once for oneDNN give torch's own convolution, on a CPU."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.encoders import DiffusionEncoder
from clipfusion.encoders.prepacking import PrepackedConv2d, convolutions_unpacked, prepack_convolutions

CASES = [  # in, out, kernel, stride, padding, bias, channels-last input
    (8, 16, 3, 1, 1, True, False),
    (16, 16, 3, 2, 1, False, True),
    (16, 4, 1, 1, 0, True, True),
    (4, 8, 3, 1, 0, True, False),
]


@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "padding", "bias", "channels_last"), CASES)
def test_a_prepacked_convolution_equals_torch_conv2d_at_every_batch_size_and_image_size(
        cin, cout, kernel, stride, padding, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias)
    assert prepack_convolutions(conv) == 1 and isinstance(conv, PrepackedConv2d)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        for batch in (1, 1, 3):
            x = torch.randn(batch, cin, 11, 13).to(memory_format=layout)
            expected = F.conv2d(x, conv.weight, conv.bias, stride, padding)
            torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
            assert conv._packed is not None and conv._packed[1].is_mkldnn  # the packed path ran
            packed = conv._packed[1]
            x = torch.randn(batch, cin, 7, 9).to(memory_format=layout)  # another image size: packed again
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, stride, padding),
                                       atol=1e-5, rtol=1e-5)
            assert conv._packed[1] is not packed


def test_a_weight_written_in_place_is_packed_again():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    prepack_convolutions(conv)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.load_state_dict({"weight": torch.randn(4, 4, 3, 3), "bias": torch.randn(4)})
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-5)


def test_weights_made_under_inference_mode_are_packed_too():
    torch.manual_seed(0)
    with torch.inference_mode():  # a model loaded, or its layout switched, under inference mode
        conv = nn.Conv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last)
        prepack_convolutions(conv)
        x = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-5)
        assert conv.weight.is_inference() and conv._packed is not None


def test_training_and_tracing_get_a_plain_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert prepack_convolutions(model) == 2
    x = torch.randn(2, 3, 6, 6)
    out = model(x)  # autograd on: torch's convolution, so gradients flow
    out.sum().backward()
    assert model[0].weight.grad is not None and model[0]._packed is None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated; exports still use it
        graph = str(torch.jit.trace(model, x).inlined_graph)
    assert "aten::_convolution" in graph and "mkldnn" not in graph


def test_the_environment_can_turn_prepacking_off(monkeypatch):
    monkeypatch.setenv("CLIPFUSION_PREPACK", "0")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    assert prepack_convolutions(model) == 0 and type(model[0]) is nn.Conv2d


def test_only_plain_zero_padded_convolutions_are_turned():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv1d(4, 4, 3))
    assert prepack_convolutions(model) == 1
    assert [type(m) for m in model] == [PrepackedConv2d, nn.Conv2d, nn.Conv2d, nn.Conv1d]


def test_the_unet_on_a_cpu_runs_prepacked_and_gives_the_maps_of_plain_convolutions():
    # packing serves float32 inference only: that is the path under test, on either CPU kind
    encoder = DiffusionEncoder.from_config(get_preset("tiny").diffusion, RuntimeConfig("cpu", "float32"))
    convolutions = [m for m in encoder.unet.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(type(m) is PrepackedConv2d for m in convolutions)
    assert not any(isinstance(m, PrepackedConv2d) for m in encoder.vae.modules())  # no gain measured there
    rng = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, encoder.config.image_size, encoder.config.image_size, generator=rng) * 2 - 1
    prompts = ["a photo of a flawless disc", "a photo of a damaged disc"]

    def outputs() -> list[torch.Tensor]:
        run = encoder.encode(pixels, prompts, token_indices=[1, 2])
        return [*run.cross_attn_maps.values(), *run.features.values()]

    packed = outputs()
    assert sum(m._packed is not None for m in convolutions) > 3  # the packed path ran
    for m in convolutions:  # the reference: torch's own convolutions
        m.__class__ = nn.Conv2d
    plain = outputs()
    assert len(packed) == len(plain) > 1
    for got, want in zip(packed, plain, strict=True):
        scale = float(want.max() - want.min())
        assert scale > 0 and float((got - want).abs().max()) <= 1e-4 * scale


def test_one_packing_serves_every_batch_size():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    prepack_convolutions(conv)
    with torch.inference_mode():
        conv(torch.randn(1, 8, 10, 10))
        packed = conv._packed[1]
        for batch in (8, 3, 1):
            x = torch.randn(batch, 8, 10, 10)
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-5)
            assert conv._packed[1] is packed


def test_unpacked_convolutions_release_their_copies_run_plain_and_pack_again_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    prepack_convolutions(model)
    x = torch.randn(1, 3, 9, 9)
    with torch.inference_mode():
        expected = F.conv2d(F.relu(F.conv2d(x, model[0].weight, model[0].bias, padding=1)), model[2].weight,
                            model[2].bias)
        model(x)
        assert model[0]._packed is not None and model[2]._packed is not None
        with convolutions_unpacked(model):
            assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
            assert "_packed" not in vars(model[0]) and "_packed" not in vars(model[2])  # the copies let go
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
            assert "_packed" not in vars(model[0])  # nothing packed inside
        assert type(model[0]) is PrepackedConv2d and model[0]._packed is None
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert model[0]._packed is not None  # packed again at its next call
