"""Text embeddings kept on disk are read back only for the very weights, prompts and precision they were
computed for, and a damaged or unwritable cache costs the speed-up, never the answer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipfusion.config import RuntimeConfig, get_preset
from clipfusion.encoders import clip as clip_module
from clipfusion.encoders.clip import ClipEncoder
from clipfusion.encoders.loading import load_open_clip
from clipfusion.encoders.text_cache import TEXT_CACHE_ENV

PROMPTS = ["a photo of a flawless disc", "a close-up photo of a damaged disc with a scratch", "disc"]
FLOAT32 = RuntimeConfig("cpu", "float32")


@pytest.fixture
def encodings(monkeypatch) -> list[int]:
    """The number of prompts each run of the text tower encoded (the cache's misses)."""
    calls: list[int] = []
    encode = clip_module.encode_tokens
    monkeypatch.setattr(clip_module, "encode_tokens", lambda model, tokens: calls.append(len(tokens))
                        or encode(model, tokens))
    return calls


def _encoder() -> ClipEncoder:
    return ClipEncoder(load_open_clip(get_preset("tiny").clip, FLOAT32))  # the same random weights every time


def _open_clips(encoder: ClipEncoder) -> torch.Tensor:
    """open_clip's own text embeddings, every column, normalised: the reference."""
    with torch.inference_mode():
        return F.normalize(encoder.model.encode_text(encoder.tokenizer(PROMPTS)).float(), dim=-1)


def test_a_second_encoder_reads_the_embeddings_the_first_wrote(tmp_path, monkeypatch, encodings):
    monkeypatch.setenv(TEXT_CACHE_ENV, str(tmp_path))
    first = _encoder()
    written = first.encode_text(PROMPTS)
    assert encodings == [3] and len(list(tmp_path.glob("*.safetensors"))) == 1
    second = _encoder()
    read = second.encode_text(PROMPTS)
    assert encodings == [3]  # the tower did not run again
    assert torch.equal(read, written)
    torch.testing.assert_close(read, _open_clips(second), atol=1e-5, rtol=0)
    second.encode_text(PROMPTS[:2])  # another prompt list is another file
    assert encodings == [3, 2] and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_changed_weights_or_precision_are_encoded_again(tmp_path, monkeypatch, encodings):
    monkeypatch.setenv(TEXT_CACHE_ENV, str(tmp_path))
    before = _encoder().encode_text(PROMPTS)
    changed = _encoder()
    with torch.no_grad():
        changed.model.text_projection.add_(0.05 * torch.randn_like(changed.model.text_projection))
    after = changed.encode_text(PROMPTS)
    assert encodings == [3, 3]
    torch.testing.assert_close(after, _open_clips(changed), atol=1e-5, rtol=0)
    assert float((after - before).abs().max()) > 1e-3  # the weights' own embeddings, not the kept ones
    half = ClipEncoder(load_open_clip(get_preset("tiny").clip, RuntimeConfig("cpu", "bfloat16")))
    assert half.dtype == torch.bfloat16
    half.encode_text(PROMPTS)
    assert encodings == [3, 3, 3]  # the same weights in another precision: encoded in that precision
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_damaged_or_foreign_file_is_encoded_again_and_replaced(tmp_path, monkeypatch, encodings):
    monkeypatch.setenv(TEXT_CACHE_ENV, str(tmp_path))
    expected = _encoder().encode_text(PROMPTS)
    other = _encoder().encode_text(PROMPTS[:1])
    mine, foreign = sorted(tmp_path.glob("*.safetensors"), key=lambda path: path.stat().st_size, reverse=True)
    good = mine.read_bytes()
    for damage in (good[: len(good) // 2], foreign.read_bytes()):  # cut short; another list's file under its name
        mine.write_bytes(damage)
        count = len(encodings)
        assert torch.equal(_encoder().encode_text(PROMPTS), expected)
        assert len(encodings) == count + 1  # computed again...
        assert mine.read_bytes() == good  # ...and the file replaced
    assert torch.equal(_encoder().encode_text(PROMPTS[:1]), other)


def test_a_cache_that_cannot_be_written_or_is_off_costs_only_the_speed(tmp_path, monkeypatch, encodings):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(TEXT_CACHE_ENV, str(blocker / "text"))
    expected = _open_clips(_encoder())
    torch.testing.assert_close(_encoder().encode_text(PROMPTS), expected, atol=1e-5, rtol=0)
    monkeypatch.setenv(TEXT_CACHE_ENV, "off")
    torch.testing.assert_close(_encoder().encode_text(PROMPTS), expected, atol=1e-5, rtol=0)
    _encoder().encode_text(PROMPTS)
    assert encodings == [3, 3, 3]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]
