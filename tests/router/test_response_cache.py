"""The router's response cache on its own: keys, tenant isolation, modes, TTL and the byte budget (LRU)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.request import ClientRequest
from pdserve.router.response_cache import CHUNK_TOKENS, CacheConfig, ResponseCache, cache_mode

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def req(tokens=(1, 2, 3), sampling=GREEDY, tenant="alice", rid="r1") -> ClientRequest:
    return ClientRequest(request_id=rid, token_ids=tuple(tokens), sampling=sampling, tenant=tenant)


def answer(num_tokens=5, finish="length", start=10):
    """A worker-like stream: one token per message, the last with finish_reason and usage."""
    out = []
    for i in range(num_tokens):
        r = pb.GenerateResponse(request_id="live", token_ids=[start + i], text=f"<{start + i}>")
        if i == num_tokens - 1 and finish:
            r.finish_reason = finish
            r.usage.prompt_tokens, r.usage.completion_tokens = 3, num_tokens
            r.decode_worker = "d:1"
        out.append(r)
    return out


class Live:
    """The live answer as the servicer hands it over: counts whether it ran."""

    def __init__(self, msgs, fail_after=None):
        self.msgs, self.fail_after, self.runs = msgs, fail_after, 0

    async def gen(self):
        self.runs += 1
        for i, m in enumerate(self.msgs):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("decode worker died")
            yield m


def through(cache, request, mode, live):
    async def go():
        return [r async for r in cache.through(request, mode, live.gen())]

    return asyncio.run(go())


def tokens_of(msgs):
    return [t for m in msgs for t in m.token_ids]


def test_a_hit_replays_the_answer_marked_cached_without_running_the_request():
    clock = Clock()
    cache = ResponseCache(CacheConfig(max_bytes=1 << 20, ttl_s=60), model="tiny", clock=clock)
    live = Live(answer(CHUNK_TOKENS + 6))
    first = through(cache, req(), "use", live)
    assert live.runs == 1 and cache.num_misses == 1 and not any(m.cached for m in first)
    again = Live(answer(3, start=900))
    hit = through(cache, req(rid="r2"), "use", again)
    assert again.runs == 0 and cache.num_hits == 1
    assert tokens_of(hit) == tokens_of(first)
    assert "".join(m.text for m in hit) == "".join(m.text for m in first)
    assert len(hit) == 2, "coalesced into messages of about CHUNK_TOKENS tokens"
    assert [m.cached for m in hit] == [False, True] and {m.request_id for m in hit} == {"r2"}
    last = hit[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == CHUNK_TOKENS + 6
    assert last.decode_worker == "" and last.timings.total_s == 0.0


def test_keys_isolate_tenants_unless_shared_and_cover_model_prompt_and_sampling():
    cache = ResponseCache(CacheConfig(max_bytes=1 << 20, shared_tenants=frozenset({"team-a", "team-b"})), "tiny")
    k = cache.key(req())
    assert k is not None and k == cache.key(req(rid="other"))
    assert cache.key(req(tenant="bob")) != k
    assert cache.key(req(tenant="")) not in (k, cache.key(req(tenant="team-a")))
    assert cache.key(req(tenant="team-a")) == cache.key(req(tenant="team-b"))
    assert cache.key(req(tokens=(1, 2, 4))) != k
    assert cache.key(req(sampling=SamplingParams(max_tokens=9, temperature=0.0))) != k
    assert cache.key(req(sampling=SamplingParams(max_tokens=8, temperature=0.0, top_p=0.5, seed=3))) == k, \
        "greedy ignores top_p and seed"
    assert cache.key(req(sampling=SamplingParams(max_tokens=8, temperature=0.0, min_p=0.5))) == k, "and min_p"
    for penalty in (dict(presence_penalty=1.0), dict(frequency_penalty=1.0), dict(repetition_penalty=1.5),
                    dict(min_tokens=2)):  # greedy answers that differ
        assert cache.key(req(sampling=SamplingParams(max_tokens=8, temperature=0.0, **penalty))) not in (None, k)
    assert ResponseCache(cache.cfg, "other-model").key(req()) != k
    seeded = SamplingParams(max_tokens=8, temperature=0.7, seed=1)
    assert cache.key(req(sampling=seeded)) not in (None, k)
    assert cache.key(req(sampling=SamplingParams(max_tokens=8, temperature=0.7, seed=2))) != cache.key(
        req(sampling=seeded))
    assert cache.key(req(sampling=SamplingParams(max_tokens=8, temperature=0.7))) is None, "unseeded: never"


def test_another_tenant_never_gets_the_answer():
    cache = ResponseCache(CacheConfig(max_bytes=1 << 20), "tiny")
    through(cache, req(tenant="alice"), "use", Live(answer()))
    bob = Live(answer(start=50))
    got = through(cache, req(tenant="bob"), "use", bob)
    assert bob.runs == 1 and cache.num_hits == 0 and tokens_of(got) == [50, 51, 52, 53, 54]


def test_bypass_and_refresh_modes_and_unknown_mode():
    cache = ResponseCache(CacheConfig(max_bytes=1 << 20), "tiny")
    live = Live(answer())
    through(cache, req(), "bypass", live)
    assert live.runs == 1 and not cache.entries and cache.num_misses == 0
    through(cache, req(), "use", Live(answer()))
    fresh = Live(answer(start=70))
    assert tokens_of(through(cache, req(), "refresh", fresh)) == [70, 71, 72, 73, 74] and fresh.runs == 1
    replay = through(cache, req(), "use", Live(answer()))
    assert tokens_of(replay) == [70, 71, 72, 73, 74] and replay[-1].cached, "refresh replaced the entry"
    assert [cache_mode(v) for v in (pb.CACHE_USE, pb.CACHE_BYPASS, pb.CACHE_REFRESH)] == ["use", "bypass", "refresh"]
    with pytest.raises(InvalidRequestError, match="cache"):
        cache_mode(7)


def test_only_complete_answers_are_stored():
    cache = ResponseCache(CacheConfig(max_bytes=1 << 20), "tiny")
    with pytest.raises(RuntimeError):
        through(cache, req(), "use", Live(answer(), fail_after=3))
    through(cache, req(), "use", Live(answer(finish="abort")))
    assert not cache.entries
    through(cache, req(sampling=SamplingParams(max_tokens=8, temperature=1.0)), "use", Live(answer()))
    assert not cache.entries and cache.num_misses == 2, "a request that cannot hit is not counted"


def test_ttl_and_lru_byte_budget():
    clock = Clock()
    probe = ResponseCache(CacheConfig(max_bytes=1 << 20), "tiny")
    through(probe, req(), "use", Live(answer()))
    size = probe.num_bytes
    cache = ResponseCache(CacheConfig(max_bytes=2 * size + size // 2, ttl_s=10), "tiny", clock=clock)
    for t in (1, 2):
        through(cache, req(tokens=(t,)), "use", Live(answer()))
    assert cache.num_bytes == 2 * size
    through(cache, req(tokens=(1,)), "use", Live(answer()))  # a hit: (1,) is now the most recently used
    through(cache, req(tokens=(3,)), "use", Live(answer()))  # evicts (2,), the least recently used
    assert cache.get(cache.key(req(tokens=(2,)))) is None and cache.get(cache.key(req(tokens=(1,)))) is not None
    assert cache.num_bytes == 2 * size
    clock.now += 10.0
    assert cache.get(cache.key(req(tokens=(1,)))) is None, "expired at its TTL"
    assert cache.num_bytes == size
    tiny = ResponseCache(CacheConfig(max_bytes=size - 1), "tiny")
    through(tiny, req(), "use", Live(answer()))
    assert not tiny.entries and tiny.num_bytes == 0, "an answer larger than the whole budget is not stored"
    with pytest.raises(ValueError, match="response_cache_ttl_s"):
        CacheConfig(ttl_s=0)


def test_one_cache_serves_every_model_apart_and_forgets_a_reloaded_adapter():
    from dataclasses import replace

    cache = ResponseCache(CacheConfig(max_bytes=1 << 20, ttl_s=60), model="base")
    base_req = req()  # model "": the default (base)
    lora_req = replace(req(), model="lora-a", base_model="base", lora_name="lora-a")
    through(cache, base_req, "use", Live(answer(4)))
    live = Live(answer(4, start=500))
    assert not through(cache, lora_req, "use", live)[-1].cached and live.runs == 1, "an adapter never gets base's"
    assert through(cache, replace(base_req, model="base"), "use", Live(answer(2)))[-1].cached, "'' is the default"
    assert through(cache, lora_req, "use", Live(answer(2)))[-1].cached
    assert cache.drop_model("lora-a") == 1 and cache.drop_model("lora-a") == 0
    live = Live(answer(4, start=600))
    assert not through(cache, lora_req, "use", live)[-1].cached and live.runs == 1, "reloaded: computed again"
    assert through(cache, base_req, "use", Live(answer(2)))[-1].cached, "other models' answers stay"


def test_a_hit_names_the_model_that_served_it_like_the_live_answer():
    from dataclasses import replace

    cache = ResponseCache(CacheConfig(max_bytes=1 << 20, ttl_s=60), model="base")
    through(cache, req(), "use", Live(answer(4)))
    assert through(cache, req(rid="r2"), "use", Live(answer(2)))[-1].model == "base", "'' is the default"
    lora_req = replace(req(), model="lora-a", base_model="base", lora_name="lora-a")
    through(cache, lora_req, "use", Live(answer(4, start=500)))
    hit = through(cache, lora_req, "use", Live(answer(2)))
    assert hit[-1].cached and hit[-1].model == "lora-a"


def test_a_cached_answer_keeps_its_stop_reason():
    """vLLM's stop_reason (the stop string or token that ended it) is replayed with the hit, not dropped."""
    for set_stop, field, value in ((lambda r: setattr(r, "stop_string", "END"), "stop_string", "END"),
                                   (lambda r: setattr(r, "stop_token_id", 7), "stop_token_id", 7)):
        cache = ResponseCache(CacheConfig(max_bytes=1 << 20), "tiny")
        msgs = answer(finish="stop")
        set_stop(msgs[-1])
        through(cache, req(), "use", Live(msgs))
        hit = through(cache, req(rid="r2"), "use", Live(answer()))
        assert hit[-1].cached and hit[-1].finish_reason == "stop" and getattr(hit[-1], field) == value
