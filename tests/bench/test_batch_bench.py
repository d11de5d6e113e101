"""``pdserve bench --batch``: the workload goes to the router as one batch job; every result comes back once."""

from __future__ import annotations

import json

from pdserve.bench.run import main


def test_bench_submits_the_workload_as_a_batch_job(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--local", "0,1", "--workload", "uniform", "--input-len-range", "8,24", "--output-len", "6",
               "--num-prompts", "12", "--batch", "--no-progress", "--result-dir", str(out),
               "--local-router-arg=--batch-db=" + str(tmp_path / "jobs.sqlite3")])
    assert rc == 0
    assert "12/12 ok" in capsys.readouterr().out
    (path,) = out.glob("uniform-batch-*.json")
    s = json.loads(path.read_text())["summary"]
    assert s["status"] == "completed" and s["num_results"] == 12
    assert (s["num_duplicate_results"], s["num_missing_results"]) == (0, 0)
    assert sorted(r["index"] for r in s["results"]) == list(range(12))
    assert all(r["output_len"] == 6 and not r["error"] for r in s["results"])


def test_an_unreachable_router_is_one_line_and_exit_status_1(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["--router", f"127.0.0.1:{port}", "--num-prompts", "2", "--batch", "--no-progress", "--no-plots",
               "--result-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"pdserve bench: router 127.0.0.1:{port}: UNAVAILABLE") and err.count("\n") == 1, err
