"""``pdserve bench --local 1,1`` against a real local cluster (router + prefill + decode processes)."""

from __future__ import annotations

import json

from pdserve.bench.metrics import Record
from pdserve.bench.run import main


def test_bench_against_a_local_cluster(tmp_path, capsys):
    # prompts of 20..60 tokens: longer than the router's local-prefill threshold (16), so they go to the
    # prefill worker and their KV crosses the transfer layer
    rc = main(["--local", "1,1", "--workload", "uniform", "--input-len-range", "20,60", "--output-len", "5",
               "--concurrency", "3", "--num-requests", "8", "--duration", "60", "--timeout", "60",
               "--out-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert "local 1,1 conc3: 8/8 ok" in capsys.readouterr().out
    doc = json.loads((tmp_path / "uniform-conc3-seed0.json").read_text())
    s = doc["summary"]
    assert s["num_requests"] == 8 and s["num_ok"] == 8 and s["errors"] == {} and s["num_short"] == 0
    assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p50"] < 60
    assert s["tpot_s"]["n"] == 8 and s["tpot_s"]["mean"] > 0 and s["itl_s"]["n"] == 8 * 4
    assert s["throughput"]["output_tokens_per_s"] > 0 and s["throughput"]["requests_per_s"] > 0
    assert s["remote_prefill_share"] > 0  # the disaggregated path was taken
    records = [Record.from_dict(r) for r in doc["records"]]
    assert all(r.ok and r.output_tokens == 5 and r.finish_reason == "length" for r in records)
    assert all(20 <= r.prompt_len <= 60 for r in records)
    assert (tmp_path / "uniform-latency_cdf.png").stat().st_size > 10_000
