"""Load harness: metrics math on synthetic timestamps, arrival processes, workloads and trace replay."""

from __future__ import annotations

import json
import statistics

import pytest

from bench import workloads
from bench.arrivals import gamma_arrivals, poisson_arrivals
from bench.metrics import Record, percentile, summarize


def rec(send, chunks, tokens=None, status="OK", prompt=10, cached=0):
    return Record(send_time=send, prompt_len=prompt, chunk_times=list(chunks),
                  chunk_tokens=list(tokens or [1] * len(chunks)), status=status, cached_prompt_tokens=cached,
                  end_time=chunks[-1] if chunks else send)


def test_per_request_latencies():
    r = rec(1.0, [1.2, 1.3, 1.5, 1.6])  # 4 tokens
    assert r.ttft == pytest.approx(0.2)
    assert r.e2e == pytest.approx(0.6)
    assert r.tpot == pytest.approx(0.4 / 3)
    assert r.itls() == pytest.approx([0.1, 0.2, 0.1])
    multi = rec(0.0, [0.5, 1.5], tokens=[1, 4])  # a chunk of 4 tokens after 1 s: 4 gaps of 0.25 s
    assert multi.itls() == pytest.approx([0.25] * 4)
    assert rec(0.0, [0.3]).tpot is None


def test_percentiles_match_numpy_linear():
    xs = [5, 1, 4, 2, 3]
    assert percentile(xs, 50) == 3
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile(list(range(101)), 99) == pytest.approx(99)
    assert percentile([7], 99) == 7


def test_summary_throughput_goodput_errors_cache_share():
    records = [
        rec(0.0, [0.1, 0.2, 0.3], prompt=100, cached=50),  # ttft 0.1, tpot 0.1 -> good
        rec(0.0, [0.5, 0.6], prompt=100),  # ttft 0.5 -> misses a 0.3 s TTFT SLO
        rec(1.0, [1.1, 1.5], prompt=200),  # tpot 0.4 -> misses a 0.2 s TPOT SLO
        rec(1.0, [], status="UNAVAILABLE", prompt=50),
    ]
    s = summarize(records, duration_s=2.0, slo_ttft_s=0.3, slo_tpot_s=0.2)
    assert s["num_ok"] == 3 and s["errors"] == {"UNAVAILABLE": 1}
    assert s["throughput"]["requests_per_s"] == pytest.approx(1.5)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(7 / 2)
    assert s["throughput"]["input_tokens_per_s"] == pytest.approx(400 / 2)
    assert s["goodput"]["share"] == pytest.approx(1 / 4)
    assert s["goodput"]["requests_per_s"] == pytest.approx(0.5)
    assert s["ttft_s"]["mean"] == pytest.approx((0.1 + 0.5 + 0.1) / 3)
    assert s["cached_prompt_token_share"] == pytest.approx(50 / 400)


def _gaps(ts):
    return [b - a for a, b in zip([0.0, *ts], ts, strict=False)]


def test_poisson_rate_and_cv():
    ts = poisson_arrivals(10.0, 20000, seed=3)
    gaps = _gaps(ts)
    assert len(ts) / ts[-1] == pytest.approx(10.0, rel=0.05)
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert cv == pytest.approx(1.0, abs=0.05)
    assert ts == poisson_arrivals(10.0, 20000, seed=3)
    assert ts != poisson_arrivals(10.0, 20000, seed=4)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_burstiness(cv):
    ts = gamma_arrivals(5.0, 20000, cv=cv, seed=1)
    gaps = _gaps(ts)
    assert len(ts) / ts[-1] == pytest.approx(5.0, rel=0.1)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(cv, rel=0.1)
    assert gamma_arrivals(5.0, 10, cv=0) == pytest.approx([0.2 * (i + 1) for i in range(10)])
    with pytest.raises(ValueError, match="rate"):
        gamma_arrivals(0, 10)


def test_workloads_are_deterministic_and_shaped():
    a = workloads.uniform(20, (64, 128), 16, seed=1)
    assert [r.token_ids for r in a] == [r.token_ids for r in workloads.uniform(20, (64, 128), 16, seed=1)]
    assert all(64 <= len(r.token_ids) <= 128 and r.output_len == 16 for r in a)
    sp = workloads.shared_prefix(24, num_system=2, system_len=64, users=4, turns=3, seed=0)
    assert len(sp) == 12
    by_user = {}
    for r in sp:
        prev = by_user.get(r.session)
        if prev is not None:
            assert r.token_ids[: len(prev)] == prev, "each turn extends the session's history"
        by_user[r.session] = r.token_ids
    heads = {tuple(r.token_ids[:64]) for r in sp}
    assert len(heads) == 2, "users share their system prompt"
    chat = workloads.chat(200, seed=2)
    assert 50 < statistics.median(len(r.token_ids) for r in chat) < 400


def test_trace_replay(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"timestamp": 100.5, "input_len": 8, "output_len": 4},
        {"timestamp": 100.0, "token_ids": [5, 6, 7], "output_len": 2},
        {"timestamp": 102.0, "input_len": 3, "output_len": 1},
    ]))
    reqs = workloads.trace(path)
    assert [r.send_at for r in reqs] == [0.0, 0.5, 2.0]
    assert [len(r.token_ids) for r in reqs] == [3, 8, 3]
    assert reqs[0].token_ids == [5, 6, 7] and [r.output_len for r in reqs] == [2, 4, 1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1, "input_len": 4, "output_len": 2}\n{"timestamp": "x"}\n')
    with pytest.raises(ValueError, match="line 2"):
        workloads.trace(bad)
