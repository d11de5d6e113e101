"""``python -m bench.prefix_routing`` scaled down, against real local clusters: round robin vs cache-aware."""

from __future__ import annotations

from pdserve.bench.prefix_routing import (
    TurnRecord,
    Workload,
    WorkloadConfig,
    format_table,
    measure,
    oracle_hits,
)
from pdserve.deploy.local import LocalCluster
from pdserve.router.policy import PairPolicy, RouteRequest
from pdserve.router.prefix_index import PrefixIndex
from tests.router.test_routing_units import batch, worker


def test_cache_aware_counts_in_flight_work_by_its_uncached_tokens():
    # p2 holds 16 blocks (256 tokens) of the prompt, p1 nothing. With one request in flight on p2 that this
    # policy routed with 40 uncached tokens, a 286-token prompt costs 40 + 30 tokens on p2 against 286 on p1.
    # (A flat 256 tokens per in-flight request made it 256 + 30 = 286: a tie, lost to p1 on the address.)
    idx = PrefixIndex()
    idx.apply("p2:1", batch(list(range(100, 116)), snapshot=True))
    pol = PairPolicy("cache_aware", idx)
    ps, ds = [worker("p1:1", "prefill"), worker("p2:1", "prefill")], [worker("d1:1", "decode")]
    first = pol.choose(RouteRequest(296, list(range(100, 116))), ps, ds)
    assert first.prefill.address == "p2:1" and first.cached_blocks == 16
    ps[1].in_flight = 1  # what the servicer does while that request prefills
    assert pol.queued_tokens(ps[1]) == 40
    assert pol.choose(RouteRequest(286, list(range(100, 116))), ps, ds).prefill.address == "p2:1"
    ps[1].in_flight = 3  # both of those, and one this policy never routed: the flat guess for that one
    assert pol.queued_tokens(ps[1]) == 40 + 30 + 256


def test_cache_aware_prefills_locally_on_the_decode_worker_holding_the_conversation():
    idx = PrefixIndex()
    idx.apply("d2:1", batch(list(range(100, 110)), snapshot=True))  # the previous turn, answer included
    ps, ds = [worker("p1:1", "prefill")], [worker("d1:1", "decode"), worker("d2:1", "decode")]
    for name, local in (("cache_aware", "d2:1"), ("round_robin", None)):
        pol = PairPolicy(name, idx, local_prefill_tokens=48)
        d = pol.choose(RouteRequest(200, list(range(100, 110))), ps, ds)  # 40 tokens uncached on d2
        if local:
            assert d.prefill is None and d.decode.address == local and d.cached_blocks == 10
        else:  # other policies keep plain conditional disaggregation: round robin picked d1 (200 uncached)
            assert d.prefill is not None and d.decode.address == "d1:1"
    pol = PairPolicy("cache_aware", idx, local_prefill_tokens=16)
    assert pol.choose(RouteRequest(200, list(range(100, 110))), ps, ds).prefill is not None  # 40 > 16


def test_oracle_counts_blocks_computed_by_earlier_requests_only():
    system = list(range(3, 35))  # 2 blocks of 16
    a = TurnRecord(0, 0, system + [40] * 20, output=[50] * 13)  # 52-token prompt: 3 full blocks
    b = TurnRecord(1, 0, system + [41] * 5)  # shares the 2 system blocks with a
    c = TurnRecord(0, 1, a.prompt + a.output + [42] * 3)  # a's prompt + answer (its last token has no KV)
    d = TurnRecord(2, 0, list(range(100, 132)))  # exactly 2 blocks, never seen: a miss
    e = TurnRecord(2, 1, list(d.prompt))  # seen, but capped at (32 - 1) // 16 = 1 block so a token is computed
    assert oracle_hits([a, b, c, d, e], 16) == [0, 32, 64, 0, 16]
    # prompt KV only: c reuses a's 3 prompt blocks but not the block that needs a's answer
    assert oracle_hits([a, b, c, d, e], 16, include_outputs=False) == [0, 32, 48, 0, 16]


def test_cache_aware_beats_round_robin_and_the_oracle_bounds_both():
    # 7 users with a system prompt each (no cross-user sharing), 2 turns, the same user order both turns,
    # 2 prefill workers: round robin sends request i to prefill worker i % 2, so every turn 1 (request i + 7)
    # lands on the worker that has never seen that conversation: round robin cannot hit at all. Cache-aware
    # routing finds the 6+ cached blocks of turn 0 in its index. --local-prefill-tokens 0 keeps every prefill
    # on the prefill pool (the decode worker holds every conversation).
    # One set of workers serves both policies, through two routers; the cache-aware run uses another seed, so
    # its prompts share no block with the round-robin run's (token ids are random).
    shape = dict(num_system=7, system_len=96, users=7, turns=2, user_len=(16, 24), out_len=(4, 8), shuffle=False)
    no_local = ["--local-prefill-tokens", "0"]
    c = LocalCluster(2, 1, policy="round_robin", extra_worker_args=["--num-blocks", "256"], router_args=no_local)
    c.start()
    try:
        workers = [(p.address, p.role) for p in c.procs if p.role in ("prefill", "decode")]
        runs = [measure("round_robin", c.router_address, workers, Workload.build(WorkloadConfig(**shape, seed=0)),
                        2, 60, 16, c.secret)]
        router = c.add_router([*no_local, "--policy", "cache_aware"])  # the last --policy wins
        runs.append(measure("cache_aware", router.address, workers,
                            Workload.build(WorkloadConfig(**shape, seed=1)), 2, 60, 16, c.secret))
    finally:
        c.stop(grace_s=3)
    rr, ca = runs[0]["summary"], runs[1]["summary"]
    for s in (rr, ca):
        assert s["num_ok"] == s["num_requests"] == 14
        assert s["local_prefill_share"] == 0
        assert s["requests_over_oracle"] == 0, "a request hit more than the infinite shared cache holds"
        assert s["oracle_hit_rate"] >= s["oracle_prompts_hit_rate"] >= s["hit_rate"]
        assert s["oracle_prompts_hit_rate"] > 0.3
    sessions = {}
    for r in runs[0]["records"]:
        sessions.setdefault(r["user"], set()).add(r["prefill_worker"])
    assert all(len(w) == 2 for w in sessions.values()), "round robin should move every session"
    assert rr["hit_rate"] == 0
    assert ca["hit_rate"] > 0.5 * ca["oracle_prompts_hit_rate"], format_table(runs)
    assert "cache_aware" in format_table(runs)
