"""Greedy parity with transformers' generate (float32): batched, with prefix hits, preemption and chunks.

The reference is HF ``generate(do_sample=False)`` run per prompt, unpadded, on a model loaded with
``AutoModelForCausalLM.from_pretrained`` from the checkpoint directory the engine itself loaded.
"""

from __future__ import annotations

import random

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.engine.helpers import assert_idle, hf_greedy

MODELS = ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-qwen3"]
MAX_TOKENS = 16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def random_prompts(seed: int, n: int = 20, max_len: int = 300) -> list[list[int]]:
    """n prompts of mixed lengths in 1..max_len (both ends included), over the whole non-special vocab."""
    rng = random.Random(seed)
    lengths = [1, max_len] + [rng.randint(1, max_len) for _ in range(n - 2)]
    return [[rng.randrange(3, 320) for _ in range(k)] for k in lengths]


BATCH = random_prompts(7)


def check(llm: LLM, prompts, expected, params=GREEDY, **kw):
    outs = llm.generate(prompts, params, **kw)
    for i, (o, want) in enumerate(zip(outs, expected, strict=True)):
        assert o.token_ids == want, f"prompt {i} (len {len(prompts[i])}): {o.token_ids} != {want}"
        assert o.finish_reason == ("stop" if want[-1] == 2 else "length"), (i, o.finish_reason, want)
    assert_idle(llm.engine)
    return outs


class ScheduleRecorder:
    """Wraps a scheduler's schedule() to record (request id, num_new_tokens, samples) per step."""

    def __init__(self, scheduler):
        self.steps: list[list[tuple[str, int, bool]]] = []
        inner = scheduler.schedule

        def schedule():
            out = inner()
            self.steps.append([(s.seq.request_id, s.num_new_tokens, s.samples) for s in out])
            return out

        scheduler.schedule = schedule


@pytest.mark.parametrize("model", MODELS)
def test_batched_greedy_matches_hf(model):
    llm = LLM(model, num_blocks=600)
    expected = hf_greedy(llm.engine.runner.model_path, BATCH, MAX_TOKENS)
    assert sum(w[-1] == 2 for w in expected) < len(expected), "want mostly full-length outputs"
    check(llm, BATCH, expected)
    assert llm.engine.scheduler.num_preemptions == 0


@pytest.mark.parametrize("model", MODELS)
def test_parity_with_prefix_cache_hits(model):
    llm = LLM(model, num_blocks=600)
    rng = random.Random(11)
    head = [rng.randrange(3, 320) for _ in range(200)]
    tails = [[rng.randrange(3, 320) for _ in range(rng.randint(1, 60))] for _ in range(5)]
    second = [head[:160] + t for t in tails] + [head[:100] + [5, 6], list(head)]
    expected = hf_greedy(llm.engine.runner.model_path, [head, *second], MAX_TOKENS)
    first_outs = check(llm, [head], expected[:1])
    assert first_outs[0].num_cached_tokens == 0
    outs = check(llm, second, expected[1:])  # a second call: the head's blocks are cached now
    # 160 = 10 full blocks of 16; head[:100] shares 6 full blocks; the identical 200-token prompt may hit
    # (200 - 1) // 16 = 12 blocks, its last block recomputed for logits
    assert [o.num_cached_tokens for o in outs] == [160] * 5 + [96, 192]


@pytest.mark.parametrize("model", MODELS)
def test_parity_under_preemption(model):
    llm = LLM(model, num_blocks=40)  # 20 prompts of up to 316 tokens (20 blocks) each cannot all fit
    expected = hf_greedy(llm.engine.runner.model_path, BATCH, MAX_TOKENS)
    check(llm, BATCH, expected)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("model", MODELS)
def test_parity_with_chunked_prefill(model):
    budget = 37  # not a multiple of the block size: chunks end mid-block
    llm = LLM(model, num_blocks=600, max_num_batched_tokens=budget)
    rec = ScheduleRecorder(llm.engine.scheduler)
    expected = hf_greedy(llm.engine.runner.model_path, BATCH, MAX_TOKENS)
    check(llm, BATCH, expected)
    assert max(sum(n for _, n, _ in step) for step in rec.steps) == budget
    chunks = [(rid, n) for step in rec.steps for rid, n, samples in step if not samples]
    assert len({rid for rid, _ in chunks}) >= 10, "most prompts were split into several chunks"


def test_parity_with_everything_at_once():
    """Tiny pool, small odd budget, shared prefixes, priorities and two waves of requests."""
    llm = LLM("tiny-mistral", num_blocks=24, max_num_batched_tokens=29)
    rng = random.Random(5)
    heads = [[rng.randrange(3, 320) for _ in range(150)] for _ in range(2)]
    wave1 = [heads[i % 2][: rng.randint(20, 150)] + [rng.randrange(3, 320)] for i in range(8)]
    wave2 = [heads[i % 2][: rng.randint(20, 150)] + [rng.randrange(3, 320) for _ in range(9)] for i in range(8)]
    path = llm.engine.runner.model_path
    check(llm, wave1, hf_greedy(path, wave1, MAX_TOKENS), priorities=[i % 3 for i in range(8)])
    outs = check(llm, wave2, hf_greedy(path, wave2, MAX_TOKENS), priorities=[(i * 7) % 3 for i in range(8)])
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_cached_tokens for o in outs) > 0


def test_string_prompts_tokenize_like_hf():
    llm = LLM("tiny", num_blocks=64)
    texts = ["Hello world", "pdserve: disaggregated prefill/decode \u00e9\u00e8 \u2713"]
    ids = [llm.tokenizer(t)["input_ids"] for t in texts]
    assert ids[0] == [3 + b for b in b"Hello world"]  # the byte tokenizer: id = 3 + byte, no BOS added
    assert ids[1] == [3 + b for b in texts[1].encode()]
    outs = llm.generate(texts, GREEDY)
    assert [o.prompt_token_ids for o in outs] == ids
    assert [o.token_ids for o in outs] == hf_greedy(llm.engine.runner.model_path, ids, MAX_TOKENS)
    assert_idle(llm.engine)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny", "tiny-mistral"])
def test_batched_greedy_matches_hf_on_cuda(model):
    from transformers import AutoModelForCausalLM, GenerationConfig

    llm = LLM(model, num_blocks=600, device="cuda", dtype="float32", max_num_batched_tokens=37)
    hf = AutoModelForCausalLM.from_pretrained(llm.engine.runner.model_path, dtype=torch.float32).cuda().eval()
    cfg = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=2)
    expected = []
    for p in BATCH:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        expected.append(gen[0, len(p) :].tolist())
    check(llm, BATCH, expected)
