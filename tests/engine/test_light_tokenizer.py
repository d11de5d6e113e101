"""The router's torch-free tokenizer encodes exactly like the engine's HF tokenizer."""

from __future__ import annotations

import pytest

from pdserve.engine.models import resolve_model
from pdserve.engine.tokenizer import LightTokenizer, load_light_tokenizer, load_tokenizer

TEXTS = ["Hello from pdserve", "", "  leading spaces", "ünïcödé ✓ 日本語", "a\nb\tc", "<s> literal specials </s>"]


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen3"])
def test_light_tokenizer_matches_hf(model):
    path, _ = resolve_model(model)
    light = load_light_tokenizer(path)
    assert isinstance(light, LightTokenizer)
    hf = load_tokenizer(path)
    assert len(light) == len(hf)
    for text in TEXTS:
        assert light.encode(text, add_special_tokens=True) == list(hf.encode(text, add_special_tokens=True)), text
        assert light.encode(text, add_special_tokens=False) == list(hf.encode(text, add_special_tokens=False))


def test_falls_back_to_transformers_without_tokenizer_json(tmp_path, monkeypatch):
    from pdserve.engine import tokenizer as tokmod

    calls = []
    monkeypatch.setattr(tokmod, "load_tokenizer", lambda p: calls.append(p) or "hf")
    assert tokmod.load_light_tokenizer(str(tmp_path)) == "hf"
    assert calls == [str(tmp_path)]
