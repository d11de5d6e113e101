"""Batched multi-LoRA: three adapters and the base in one batch equal each run alone; LRU slots; deferral
when a step would need more adapters than slots; the KV hand-off with an adapter on both sides."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.kv_cache import export_block_views, import_blocks
from tests.engine.helpers import assert_idle
from tests.engine.lora_helpers import make_adapter

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-batching")
    path = LLM("tiny", num_blocks=8).engine.runner.model_path
    ranks = {"a": 8, "b": 16, "c": 4}
    return {n: make_adapter(path, root / n, ranks[n], seed=10 + i) for i, n in enumerate(NAMES)}


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(1, 60))] for _ in range(n)]


def _alone(llm, prompts, loras):
    """Each prompt run by itself (a batch of one), under its adapter."""
    return [llm.generate([p], GREEDY, lora_name=name)[0].token_ids for p, name in zip(prompts, loras, strict=True)]


def _spy_steps(llm) -> list[set]:
    """Record the adapter names (None: base) of every step the runner executes."""
    steps: list[set] = []
    inner = llm.engine.runner.execute

    def spy(items, layer_hook=None):
        steps.append({it.lora.name if it.lora is not None else None for it in items})
        return inner(items, layer_hook)

    llm.engine.runner.execute = spy
    return steps


@pytest.mark.parametrize("impl", ["native", "hf"])
def test_mixed_batch_of_three_adapters_and_base_matches_each_alone(adapters, impl):
    llm = LLM("tiny", num_blocks=256, enable_lora=True, model_impl=impl, lora_modules=adapters,
              enable_prefix_caching=False)
    prompts = _prompts(1, 12)
    loras = [[*NAMES, None][i % 4] for i in range(len(prompts))]
    alone = _alone(llm, prompts, loras)
    steps = _spy_steps(llm)
    mixed = llm.generate(prompts, GREEDY, lora_name=loras)
    assert [o.token_ids for o in mixed] == alone
    assert {"a", "b", "c", None} in steps, "one step ran all three adapters and the base together"
    # same prompt, four models: four different continuations (the adapters really differ)
    same = llm.generate([prompts[5]] * 4, GREEDY, lora_name=[*NAMES, None])
    assert len({tuple(o.token_ids) for o in same}) == 4
    assert_idle(llm.engine)


def test_lru_slots_with_more_adapters_than_slots(adapters):
    big = LLM("tiny", num_blocks=256, enable_lora=True, max_loras=4, lora_modules=adapters)
    prompts = _prompts(2, 9)
    loras = [NAMES[i % 3] for i in range(len(prompts))]
    want = _alone(big, prompts, loras)
    llm = LLM("tiny", num_blocks=256, enable_lora=True, max_loras=2, lora_modules=adapters)
    slots = llm.engine.runner.lora_slots
    # across requests: a, b, c, a, ... one at a time, each swap evicting the least recently used
    got = _alone(llm, prompts[:4], loras[:4])
    assert got == want[:4]
    assert slots.num_swaps == 4  # a, b, c (evicts a), a (evicts b)
    assert [slots.occupant[s].name for s in slots.resident.values()] == ["c", "a"]
    # one call needing three adapters with two slots: the scheduler defers the third, outputs are unchanged
    steps = _spy_steps(llm)
    outs = llm.generate(prompts, GREEDY, lora_name=loras)
    assert [o.token_ids for o in outs] == want
    assert steps and max(len(s - {None}) for s in steps) == 2
    assert_idle(llm.engine)


def test_kv_handoff_with_an_adapter(adapters):
    prompt = _prompts(3, 1)[0] + list(range(10, 40))
    single = LLM("tiny", num_blocks=64, enable_lora=True, lora_modules=adapters)
    want = single.generate([prompt], GREEDY, lora_name="b")[0].token_ids
    a = LLM("tiny", num_blocks=64, enable_lora=True, lora_modules=adapters).engine
    b = LLM("tiny", num_blocks=64, enable_lora=True, lora_modules=adapters).engine
    a.add_request("r", prompt, GREEDY, prefill_only=True, lora_name="b")
    outs = []
    while a.has_unfinished():
        outs += a.step()
    first = outs[0].new_token_ids[0]
    assert first == want[0]
    dst = b.reserve("r", len(prompt), lora_name="b")
    for layer in range(len(a.runner.kv.layers)):
        data = torch.cat(export_block_views(a.runner.kv.layers[layer], a.held["r"]))
        import_blocks(b.runner.kv.layers[layer], dst, data)
    out = b.add_prefilled_request("r", prompt, first, GREEDY, lora_name="b")
    tokens = list(out.new_token_ids)
    while b.has_unfinished():
        tokens += [t for o in b.step() for t in o.new_token_ids]
    assert tokens == want
    a.release("r")
    assert_idle(a)
    assert_idle(b)
