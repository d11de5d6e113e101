"""Router pieces without processes: prefix index, pair policies, conditional disaggregation, admission."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.engine.layout import LayoutFingerprint
from pdserve.router.admission import Admission, AdmissionError, TokenBucket, parse_tenant_rates
from pdserve.router.costs import REMOTE, SAME_GPU, SAME_HOST, CostModel, Ewma, topology
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Worker
from pdserve.router.policy import PairPolicy, RouteRequest
from pdserve.router.prefix_index import BlockEvents, PrefixIndex

FP = LayoutFingerprint(model_id="tiny", revision="main", num_layers=4, num_kv_heads=2, head_dim=32,
                       block_size=16, dtype="float32", hash_seed=0)


def worker(addr, role, queued=0, running=0, free=100, host="h1", device="cpu"):
    load = WorkerLoad(address=addr, role=role, num_queued_tokens=queued, num_running=running,
                         num_free_blocks=free, num_total_blocks=100, fingerprint=FP, host=host, device=device,
                         step_s=0.001)
    return Worker(addr, role, channel=None, stub=None, load=load, healthy=True)


def batch(stored=(), evicted=(), snapshot=False, cleared=False, seq=1):
    return BlockEvents(stored=tuple(stored), evicted=tuple(evicted), snapshot=snapshot, cleared=cleared, seq=seq)


def set_load(w: Worker, **changes) -> None:
    w.load = dataclasses.replace(w.load, **changes)


def test_prefix_index_snapshot_deltas_and_overlap():
    idx = PrefixIndex()
    idx.apply("p1", batch([1, 2, 3], snapshot=True))
    idx.apply("p2", batch([1, 2], snapshot=True))
    assert idx.overlap([1, 2, 3, 4], ["p1", "p2", "p3"]) == {"p1": 3, "p2": 2, "p3": 0}
    idx.apply("p1", batch(evicted=[2], seq=2))  # a hole breaks the prefix
    assert idx.overlap([1, 2, 3], ["p1", "p2"]) == {"p1": 1, "p2": 2}
    idx.apply("p2", batch([9], snapshot=True))  # a new snapshot replaces everything
    assert idx.hashes_of("p2") == {9}
    assert idx.overlap([1], ["p2"]) == {"p2": 0}
    idx.apply("p1", batch(cleared=True, seq=3))
    assert idx.hashes_of("p1") == set() and 1 not in idx.by_hash
    idx.remove_worker("p2")
    assert idx.by_hash == {} and "p2" not in idx.by_worker


def test_cache_aware_prefers_the_worker_holding_the_prefix():
    idx = PrefixIndex()
    idx.apply("p2:1", batch(list(range(100, 120)), snapshot=True))
    pol = PairPolicy("cache_aware", idx)
    ps = [worker("p1:1", "prefill"), worker("p2:1", "prefill")]
    ds = [worker("d1:1", "decode")]
    d = pol.choose(RouteRequest(320, list(range(100, 120))), ps, ds)
    assert d.prefill.address == "p2:1" and d.cached_blocks == 20
    # but not when that worker has a long queue
    set_load(ps[1], num_queued_tokens=100_000)
    d = pol.choose(RouteRequest(320, list(range(100, 120))), ps, ds)
    assert d.prefill.address == "p1:1"


def test_cache_aware_scores_pairs_jointly_by_topology():
    pol = PairPolicy("cache_aware")
    pol.costs.kv_bytes_per_token = 1e6  # make transfer cost dominate
    ps = [worker("p1:1", "prefill", host="a")]
    ds = [worker("d1:1", "decode", host="b"), worker("d2:1", "decode", host="a")]
    d = pol.choose(RouteRequest(1000, []), ps, ds)
    assert d.decode.address == "d2:1", "same-host decode should win when transfer dominates"


def test_conditional_disaggregation():
    idx = PrefixIndex()
    idx.apply("d1:1", batch([1, 2, 3], snapshot=True))
    pol = PairPolicy("round_robin", idx, local_prefill_tokens=16)
    ps, ds = [worker("p1:1", "prefill")], [worker("d1:1", "decode")]
    assert pol.choose(RouteRequest(10, []), ps, ds).prefill is None  # short prompt
    assert pol.choose(RouteRequest(60, [1, 2, 3]), ps, ds).prefill is None  # 12 uncached on decode
    assert pol.choose(RouteRequest(60, []), ps, ds).prefill is not None
    assert pol.choose(RouteRequest(60, []), [], ds).reason == "no prefill worker"
    sat = PairPolicy("least_loaded", saturation_s=0.01)
    set_load(ps[0], num_queued_tokens=10_000)
    assert sat.choose(RouteRequest(60, []), ps, ds).reason == "prefill pool saturated"
    with pytest.raises(LookupError):
        pol.choose(RouteRequest(60, []), ps, [])


def test_round_robin_least_loaded_p2c_affinity():
    ps = [worker(f"p{i}:1", "prefill", queued=q) for i, q in enumerate([50, 5, 500])]
    ds = [worker(f"d{i}:1", "decode", running=r) for i, r in enumerate([3, 0, 9])]
    rr = PairPolicy("round_robin")
    picks = [rr.choose(RouteRequest(100, []), ps, ds) for _ in range(3)]
    assert [p.prefill.address for p in picks] == ["p0:1", "p1:1", "p2:1"]
    ll = PairPolicy("least_loaded").choose(RouteRequest(100, []), ps, ds)
    assert (ll.prefill.address, ll.decode.address) == ("p1:1", "d1:1")
    p2c = PairPolicy("power_of_two", seed=1)
    for _ in range(20):
        d = p2c.choose(RouteRequest(100, []), ps, ds)
        assert d.prefill.address != "p2:1" and d.decode.address != "d2:1"  # never the worst of any two
    aff = PairPolicy("session_affinity")
    a = {(aff.choose(RouteRequest(100, [], "alice"), ps, ds).prefill.address) for _ in range(5)}
    assert len(a) == 1
    keys = {aff.choose(RouteRequest(100, [], f"user{i}"), ps, ds).prefill.address for i in range(30)}
    assert len(keys) == 3, "different sessions should spread"
    with pytest.raises(ValueError, match="policy"):
        PairPolicy("nope")


def test_cost_model_separates_fixed_overhead_from_per_token_cost():
    """A worker whose prefills are short (cache hits) must not look slower per token than one doing long ones."""
    cm = CostModel()
    for i in range(20):
        cm.observe_prefill("hits", 8 + i, 0.1 + (8 + i) * 1e-4)
        cm.observe_prefill("misses", 900 + 10 * i, 0.1 + (900 + 10 * i) * 1e-4)
    assert cm.prefill_fit.coefficients(0)[0] == pytest.approx(0.1, rel=0.05)
    assert cm.prefill_fit.coefficients(0)[1] == pytest.approx(1e-4, rel=0.05)
    assert cm.prefill_s("hits", 0, 200) == pytest.approx(cm.prefill_s("misses", 0, 200), rel=0.05)
    assert cm.prefill_s("hits", 0, 200) == pytest.approx(0.12, rel=0.05)
    assert cm.prefill_s("hits", 500, 0) == pytest.approx(0.05, rel=0.05)  # queued work only: no overhead


def test_cost_model_learns_a_slow_worker_and_forgets_it_without_samples():
    now = [0.0]
    cm = CostModel(clock=lambda: now[0])
    for i in range(30):
        cm.observe_prefill("fast", 100 + i, 0.01 + (100 + i) * 1e-4)
        cm.observe_prefill("slow", 100 + i, 2 * (0.01 + (100 + i) * 1e-4))
    assert cm.speed_of("slow") / cm.speed_of("fast") == pytest.approx(2, rel=0.25)
    assert cm.speed_of("unseen") == 1.0
    now[0] += 10 * 30.0  # ten half-lives with no sample: tried again as if average
    assert cm.speed_of("slow") == pytest.approx(1, abs=0.01)


def test_cost_model_learns_online():
    cm = CostModel()
    cm.observe_prefill("p", 1000, 0.5)
    assert cm.tok_cost("p") == pytest.approx(5e-4)
    assert cm.tok_cost("other") == pytest.approx(5e-4)  # unknown workers use the pool average
    cm.observe_transfer(SAME_HOST, 10_000_000, 0.01)
    assert cm.bandwidth[SAME_HOST].value == pytest.approx(1e9)
    e = Ewma(1.0, alpha=0.5, samples=1)
    e.update(3.0)
    assert e.value == 2.0
    a = WorkerLoad(host="x", device="cuda:0")
    assert topology(a, WorkerLoad(host="x", device="cuda:0")) == SAME_GPU
    assert topology(a, WorkerLoad(host="x", device="cuda:1")) == SAME_HOST
    assert topology(a, WorkerLoad(host="y", device="cuda:0")) == REMOTE


def test_token_bucket_and_admission():
    b = TokenBucket(rate=2.0, burst=2.0)
    t = b.updated
    assert b.take(t) == 0 and b.take(t) == 0
    assert b.take(t) == pytest.approx(0.5)
    assert b.take(t + 0.5) == 0
    adm = Admission(parse_tenant_rates(["alice=1:1"]), shed_ttft_s=0.1)
    adm.check_rate("alice")
    with pytest.raises(AdmissionError, match="alice") as err:
        adm.check_rate("alice")
    assert err.value.retry_after_s > 0
    adm.check_rate("bob")  # no limit for bob
    adm.check_slo(0.05, 0)
    with pytest.raises(AdmissionError, match="SLO"):
        adm.check_slo(0.15, 0)
    adm.check_slo(0.15, priority=1)  # high priority gets twice the budget
    assert adm.num_shed == 1 and adm.num_rate_limited == 1
    with pytest.raises(ValueError, match="tenant-rate"):
        parse_tenant_rates(["alice"])
    with pytest.raises(ValueError):
        parse_tenant_rates(["alice=0"])


def test_dns_discovery_adds_and_removes(monkeypatch):
    import asyncio

    from pdserve.router.membership import Membership

    answers = {"pods": ["10.0.0.1", "10.0.0.2"]}

    async def fake_getaddrinfo(host, port, type=None):
        return [(None, None, None, "", (ip, port)) for ip in answers["pods"]]

    async def go():
        m = Membership(dns=[("decode", "decode-headless:7002")])
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
        await m.discover()
        first = sorted(m.workers)
        answers["pods"] = ["10.0.0.2", "10.0.0.3"]  # a pod went away, a new one came
        await m.discover()
        second = sorted(m.workers)
        await m.close()
        return first, second

    first, second = asyncio.run(go())
    assert first == ["10.0.0.1:7002", "10.0.0.2:7002"]
    assert second == ["10.0.0.2:7002", "10.0.0.3:7002"]
