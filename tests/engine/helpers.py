"""Helpers shared by the engine tests: HF references from the engine's own checkpoint dir, idle checks."""

from __future__ import annotations

import torch

_HF_MODELS: dict[str, torch.nn.Module] = {}
_HF_OUTPUTS: dict[tuple[str, tuple[int, ...], int], list[int]] = {}


def hf_model(path: str):
    """transformers' own model (default attention) from a local checkpoint dir, float32, cached."""
    from transformers import AutoModelForCausalLM

    if path not in _HF_MODELS:
        _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_MODELS[path]


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """HF ``generate(do_sample=False)`` per prompt, unpadded; stops at eos (id 2) like the engine."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    out = []
    for p in prompts:
        key = (path, tuple(p), max_tokens)
        if key not in _HF_OUTPUTS:
            ids = torch.tensor([p])
            with torch.no_grad():
                gen = hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            _HF_OUTPUTS[key] = gen[0, len(p) :].tolist()
        out.append(_HF_OUTPUTS[key])
    return out


def assert_idle(engine) -> None:
    """No request left behind and no block referenced by anything but a live request (here: none)."""
    assert not engine.has_unfinished(), "requests left in the scheduler"
    assert engine.seqs == {} and engine.reservations == {} and engine.held == {}
    engine.check_integrity()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
