"""Metrics math on synthetic timestamps with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pdserve.bench.metrics import Record, dist, percentile, run_duration, summarize


def rec(send, chunks, tokens=None, status="OK", prompt=10, cached=0, output_len=0, end=None):
    return Record(send_time=send, prompt_len=prompt, chunk_times=list(chunks),
                  chunk_tokens=list(tokens or [1] * len(chunks)), status=status, cached_prompt_tokens=cached,
                  end_time=end if end is not None else (chunks[-1] if chunks else send), output_len=output_len)


def test_per_request_ttft_e2e_tpot_itl():
    r = rec(1.0, [1.2, 1.3, 1.5, 1.6])  # 4 tokens, one per message
    assert r.ttft == pytest.approx(0.2)
    assert r.e2e == pytest.approx(0.6)
    assert r.tpot == pytest.approx(0.4 / 3)
    assert r.itls() == pytest.approx([0.1, 0.2, 0.1])
    assert r.output_tokens == 4


def test_multi_token_messages_split_their_gap_per_token():
    r = rec(0.0, [0.5, 1.5, 1.7], tokens=[1, 4, 2])  # 7 tokens
    assert r.itls() == pytest.approx([0.25] * 4 + [0.1] * 2)
    assert r.tpot == pytest.approx((1.7 - 0.5) / 6)
    assert r.output_tokens == 7


def test_end_of_stream_after_the_last_message_counts_in_e2e():
    r = rec(0.0, [0.1, 0.2], end=0.3)
    assert r.e2e == pytest.approx(0.3)
    assert r.tpot == pytest.approx(0.2)


def test_one_token_output_has_no_tpot_and_meets_any_tpot_slo():
    r = rec(0.0, [0.3])
    assert r.tpot is None and r.itls() == []
    assert r.meets_slo(slo_ttft_s=0.5, slo_tpot_s=0.001)
    assert not r.meets_slo(slo_ttft_s=0.2, slo_tpot_s=1.0)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.5]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_known_values_and_edges():
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile([5, 1, 4, 2, 3], 90) == pytest.approx(4.6)
    assert percentile(list(range(101)), 99) == pytest.approx(99)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q"):
        percentile([1], 101)
    assert dist([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    assert dist([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7),
                                          "p99": pytest.approx(3.97), "n": 4}


def test_summary_throughput_goodput_errors_cache_share():
    records = [
        rec(0.0, [0.1, 0.2, 0.3], prompt=100, cached=50, output_len=3),  # ttft 0.1, tpot 0.1 -> good
        rec(0.0, [0.5, 0.6], prompt=100, output_len=2),  # ttft 0.5 -> misses a 0.3 s TTFT SLO
        rec(1.0, [1.1, 1.5], prompt=200, output_len=4),  # tpot 0.4 -> misses a 0.2 s TPOT SLO; short output
        rec(1.0, [], status="UNAVAILABLE", prompt=50, end=2.0),
        rec(1.5, [], status="DEADLINE_EXCEEDED", prompt=50, end=1.9),
    ]
    s = summarize(records, duration_s=2.0, slo_ttft_s=0.3, slo_tpot_s=0.2)
    assert s["num_requests"] == 5 and s["num_ok"] == 3 and s["num_short"] == 1
    assert s["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert s["throughput"]["requests_per_s"] == pytest.approx(1.5)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(7 / 2)
    assert s["throughput"]["input_tokens_per_s"] == pytest.approx(400 / 2)
    assert s["goodput"]["share"] == pytest.approx(1 / 5)  # of all requests sent, failures included
    assert s["goodput"]["requests_per_s"] == pytest.approx(0.5)
    assert s["ttft_s"]["mean"] == pytest.approx((0.1 + 0.5 + 0.1) / 3)
    assert s["tpot_s"]["p50"] == pytest.approx(0.1)
    assert s["e2e_s"]["n"] == 3 and s["itl_s"]["n"] == 4
    assert s["cached_prompt_token_share"] == pytest.approx(50 / 400)


def test_summary_duration_defaults_to_first_send_to_last_response():
    records = [rec(1.0, [1.5, 2.0]), rec(2.0, [2.2, 3.0]), rec(2.5, [], status="INTERNAL", end=5.0)]
    assert run_duration(records) == pytest.approx(4.0)
    s = summarize(records)
    assert s["duration_s"] == pytest.approx(4.0)
    assert s["throughput"]["requests_per_s"] == pytest.approx(2 / 4)


def test_ok_status_without_messages_counts_as_empty_error():
    s = summarize([rec(0.0, [], end=1.0)])
    assert s["num_ok"] == 0 and s["errors"] == {"EMPTY": 1}
    assert s["ttft_s"]["p50"] is None


def test_summary_is_strict_json_even_with_no_data():
    json.dumps(summarize([]), allow_nan=False)
    json.dumps(summarize([rec(0.0, [], status="UNAVAILABLE")]), allow_nan=False)


def test_record_round_trips_through_a_dict():
    r = rec(0.5, [0.6, 0.7], tokens=[1, 2], cached=16, output_len=3)
    assert Record.from_dict(json.loads(json.dumps(r.to_dict()))) == r
