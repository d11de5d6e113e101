"""The prefix cache keyed by adapter: no reuse across adapters or the base, blocks of an unloaded or replaced
adapter dropped (with eviction events), and requests running on an adapter while it is unloaded."""

from __future__ import annotations

import random

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.errors import AdapterNotFoundError
from pdserve.engine.hashing import adapter_extra, block_hashes
from tests.engine.helpers import assert_idle
from tests.engine.lora_helpers import make_adapter

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = [random.Random(4).randrange(3, 320) for _ in range(100)]  # 6 full blocks may hit: 96 tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-cache")
    path = LLM("tiny", num_blocks=8).engine.runner.model_path
    return {n: make_adapter(path, root / n, 8, seed=20 + i) for i, n in enumerate("abc")}


@pytest.fixture(scope="module")
def reference(adapters):
    """PROMPT's tokens under each adapter and the base, from an engine without a prefix cache."""
    llm = LLM("tiny", num_blocks=64, enable_lora=True, lora_modules=adapters, enable_prefix_caching=False)
    return {n: llm.generate([PROMPT], GREEDY, lora_name=n)[0].token_ids for n in ["a", "b", "c", None]}


def test_adapter_extra_keeps_base_hashes_and_separates_adapters():
    assert adapter_extra(None) == b"" and adapter_extra("") == b""
    ids = list(range(64))
    base = block_hashes(ids, 16)
    assert block_hashes(ids, 16, extra=adapter_extra(None)) == base
    a, b = block_hashes(ids, 16, extra=adapter_extra("a")), block_hashes(ids, 16, extra=adapter_extra("b"))
    assert len({a[0], b[0], base[0]}) == 3 and not set(a) & set(base)


def test_no_prefix_hits_across_adapters_or_the_base(adapters, reference):
    llm = LLM("tiny", num_blocks=64, enable_lora=True, lora_modules=adapters)
    for name in ["a", "b", None]:
        out = llm.generate([PROMPT], GREEDY, lora_name=name)[0]
        assert out.num_cached_tokens == 0, f"{name}: reused another model's KV"
        assert out.token_ids == reference[name]
    for name in ["a", "b", None]:  # each hits its own blocks
        out = llm.generate([PROMPT], GREEDY, lora_name=name)[0]
        assert out.num_cached_tokens == 96 and out.token_ids == reference[name]
    assert_idle(llm.engine)


def test_unload_and_reload_under_the_same_name_drops_the_old_kv(adapters, reference):
    llm = LLM("tiny", num_blocks=64, enable_lora=True, lora_modules={"a": adapters["a"], "b": adapters["b"]})
    eng = llm.engine
    eng.pool.record_events = True
    llm.generate([PROMPT], GREEDY, lora_name="a")
    llm.generate([PROMPT], GREEDY, lora_name="b")
    stored = [h for e in eng.pool.drain_events() if e.kind == "stored" for h in e.block_hashes]
    a_hashes = set(block_hashes(PROMPT + reference["a"], 16, extra=adapter_extra("a")))
    assert a_hashes <= set(stored)
    assert eng.unload_adapter("a") and not eng.unload_adapter("a")
    assert eng.adapters() == ["b"]
    assert [o.name for o in eng.runner.lora_slots.occupant if o is not None] == ["b"], "a's slot is freed"
    evicted = [h for e in eng.pool.drain_events() if e.kind == "evicted" for h in e.block_hashes]
    assert set(evicted) == a_hashes, "exactly a's blocks are dropped, reported as evictions"
    assert not a_hashes & set(eng.pool.cached)
    with pytest.raises(AdapterNotFoundError, match="'a'"):
        llm.generate([PROMPT], GREEDY, lora_name="a")
    eng.load_adapter("a", adapters["c"])  # new weights under the old name
    out = llm.generate([PROMPT], GREEDY, lora_name="a")[0]
    assert out.num_cached_tokens == 0 and out.token_ids == reference["c"]
    assert llm.generate([PROMPT], GREEDY, lora_name="b")[0].num_cached_tokens == 96, "b's cache is untouched"
    eng.load_adapter("b", adapters["a"])  # replacing drops too
    out = llm.generate([PROMPT], GREEDY, lora_name="b")[0]
    assert out.num_cached_tokens == 0 and out.token_ids == reference["a"]
    assert_idle(eng)


@pytest.mark.parametrize("action", ["unload", "replace"])
def test_requests_running_on_an_unloaded_adapter_finish_on_its_weights(adapters, reference, action):
    llm = LLM("tiny", num_blocks=64, enable_lora=True, lora_modules=adapters)
    eng = llm.engine
    eng.add_request("r", PROMPT, GREEDY, lora_name="b")
    tokens = []
    for _ in range(3):  # the prompt and two decode steps
        tokens += [t for o in eng.step() for t in o.new_token_ids]
    if action == "unload":
        assert eng.unload_adapter("b")
    else:
        eng.load_adapter("b", adapters["c"])
    eng.add_request("s", PROMPT, GREEDY, lora_name="a")  # shares the step with the retired adapter
    while eng.has_unfinished():
        tokens += [t for o in eng.step() if o.request_id == "r" for t in o.new_token_ids]
    assert tokens == reference["b"]
    assert "b" not in eng.pool.block_tag.values(), "nothing the retired adapter computed is cached"
    eng.check_integrity()
    if action == "unload":
        with pytest.raises(AdapterNotFoundError):
            eng.add_request("t", PROMPT, GREEDY, lora_name="b")
    else:  # the new "b" computes its own KV, never the retired one's
        out = llm.generate([PROMPT], GREEDY, lora_name="b")[0]
        assert out.num_cached_tokens == 0 and out.token_ids == reference["c"]
    assert_idle(eng)
