"""``pdserve bench`` against a real local cluster writes its JSON and plots."""

from __future__ import annotations

import json

from bench.run import main


def test_bench_against_a_local_cluster(tmp_path):
    rc = main(["--local", "1,1", "--workload", "uniform", "--input-len-range", "20,60", "--output-len", "5",
               "--concurrency", "3", "--num-requests", "8", "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "uniform-conc3-seed0.json").read_text())
    s = data["summary"]
    assert s["num_ok"] == 8 and s["errors"] == {}
    assert s["ttft_s"]["p50"] > 0 and s["e2e_s"]["p50"] >= s["ttft_s"]["p50"]
    assert all(sum(r["chunk_tokens"]) == 5 for r in data["records"])
    assert (tmp_path / "uniform-latency_cdf.png").stat().st_size > 10_000
