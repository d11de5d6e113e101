"""Greedy parity with transformers' generate on CPU float32: batched, with prefix hits, preemption, chunks."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from engine import LLM, SamplingParams

MAX_TOKENS = 16


def prompts(seed: int, n: int = 20, max_len: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, max_len] + [rng.randint(1, max_len) for _ in range(n - 2)]
    return [[rng.randrange(3, 259) for _ in range(k)] for k in lengths]


def hf_greedy(path: str, batch: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    out = []
    with torch.no_grad():
        for p in batch:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            out.append(gen[0, len(p):].tolist())
    return out


def check(llm: LLM, batch, expected):
    outs = llm.generate(batch, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for i, (o, want) in enumerate(zip(outs, expected, strict=True)):
        assert o.token_ids == want, f"prompt {i} (len {len(batch[i])}): {o.token_ids} != {want}"
        assert o.finish_reason == ("stop" if want and want[-1] == 2 else "length")
    llm.engine.check_integrity()
    return outs


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-qwen3"])
def test_batched_greedy_matches_hf(model):
    llm = LLM(model, num_blocks=600)
    batch = prompts(7)
    check(llm, batch, hf_greedy(llm.engine.runner.model_path, batch))


def test_parity_with_prefix_hits_preemption_and_chunking():
    llm = LLM("tiny", num_blocks=600, max_num_batched_tokens=64)  # small budget: prompts span chunks
    base = prompts(11, n=8, max_len=200)
    head = base[1]  # 200 tokens
    shared = [head[:160] + p[:40] for p in base[2:]] + [head[:96] + [5]]
    expected = hf_greedy(llm.engine.runner.model_path, [head, *shared])
    check(llm, [head], expected[:1])  # warms the cache with the shared head
    outs = check(llm, shared, expected[1:])
    assert all(o.num_cached_tokens >= 96 for o in outs), [o.num_cached_tokens for o in outs]

    tight = LLM("tiny", num_blocks=40)  # 20 prompts of up to 300 tokens cannot all fit: preemption
    batch = prompts(13, n=12, max_len=200)
    check(tight, batch, hf_greedy(tight.engine.runner.model_path, batch))
    assert tight.engine.scheduler.num_preemptions > 0
