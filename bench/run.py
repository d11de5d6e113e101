"""``pdserve bench``: drive a pdserve cluster over the public gRPC API and report serving metrics.

    pdserve bench --router 127.0.0.1:50051 --workload chat --rate 4 --num-requests 200
    pdserve bench --local 1,1 --workload uniform --input-len-range 64,512 --output-len 64 --concurrency 8
    pdserve bench --local 1,1 --rates 1,2,4 --num-requests 60          # a sweep: one run per rate
    pdserve bench --router ADDR --workload trace --trace requests.jsonl

Writes one JSON per run (config, summary, per-request records) and PNG plots into --out-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from bench import plots, workloads
from bench.arrivals import gamma_arrivals
from bench.client import run_closed_loop, run_open_loop
from bench.metrics import summarize


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="pdserve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--router", help="router host:port of a running cluster")
    target.add_argument("--local", help="P,D: start a local cluster with P prefill and D decode workers")
    p.add_argument("--model", default="tiny", help="with --local")
    p.add_argument("--local-arg", action="append", default=[], help="extra worker flag for --local (repeatable)")
    p.add_argument("--workload", default="chat", choices=["chat", "uniform", "shared-prefix", "long-context", "trace"])
    p.add_argument("--trace", help="JSONL trace for --workload trace")
    p.add_argument("--input-len-range", default="64,512")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab-range", default="3,259", help="token ids are drawn from [lo, hi)")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s (0: closed loop)")
    p.add_argument("--rates", default="", help="sweep: comma-separated rates, one run each")
    p.add_argument("--burstiness", type=float, default=1.0, help="coefficient of variation of gaps (1 = Poisson)")
    p.add_argument("--concurrency", type=int, default=8, help="closed loop: clients in flight")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline (s)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/out")
    p.add_argument("--label", default="")
    p.add_argument("--no-progress", action="store_true")
    return p


def make_workload(a) -> list[workloads.BenchRequest]:
    vocab = tuple(int(x) for x in a.vocab_range.split(","))
    lo, hi = (int(x) for x in a.input_len_range.split(","))
    n = a.num_requests
    if a.workload == "uniform":
        return workloads.uniform(n, (lo, hi), a.output_len, a.seed, vocab)
    if a.workload == "chat":
        return workloads.chat(n, a.seed, vocab)
    if a.workload == "shared-prefix":
        return workloads.shared_prefix(n, seed=a.seed, vocab=vocab, out_len=a.output_len)
    if a.workload == "long-context":
        return workloads.long_context(n, hi, a.output_len, a.seed, vocab)
    if not a.trace:
        raise ValueError("trace: --workload trace needs --trace FILE")
    return workloads.trace(a.trace, a.seed, vocab)[:n]


def run_once(a, address: str, rate: float, seed_offset: int = 0) -> tuple[dict, list]:
    """One run. In a sweep each rate gets fresh prompts (seed + offset), so earlier runs cannot warm the
    prefix cache for later ones."""
    saved = a.seed
    a.seed = saved + seed_offset
    try:
        reqs = make_workload(a)
    finally:
        a.seed = saved
    t0 = time.perf_counter()
    progress = not a.no_progress
    if a.workload == "trace":
        records = asyncio.run(run_open_loop(address, reqs, [r.send_at for r in reqs], a.duration, a.timeout, progress))
    elif rate > 0:
        send_at = gamma_arrivals(rate, len(reqs), a.burstiness, a.seed)
        records = asyncio.run(run_open_loop(address, reqs, send_at, a.duration, a.timeout, progress))
    else:
        records = asyncio.run(run_closed_loop(address, reqs, a.concurrency, a.duration, a.timeout, progress))
    wall = time.perf_counter() - t0
    summary = summarize(records, None, a.slo_ttft_s, a.slo_tpot_s)
    summary["wall_s"] = wall
    return summary, records


def print_summary(label: str, s: dict) -> None:
    t, g = s["throughput"], s["goodput"]
    print(f"== {label}: {s['num_ok']}/{s['num_requests']} ok in {s['duration_s']:.1f}s, errors {s['errors'] or 'none'}")
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = s[k]
        print(f"   {k[:-2].upper():5} ms  mean {d['mean'] * 1e3:8.1f}  p50 {d['p50'] * 1e3:8.1f}  "
              f"p90 {d['p90'] * 1e3:8.1f}  p99 {d['p99'] * 1e3:8.1f}")
    print(f"   throughput {t['requests_per_s']:.2f} req/s, {t['input_tokens_per_s']:.0f} in tok/s, "
          f"{t['output_tokens_per_s']:.1f} out tok/s; goodput {g['share']:.0%} = {g['requests_per_s']:.2f} req/s; "
          f"cached prompt share {s['cached_prompt_token_share']:.1%}")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    a = args or build_parser().parse_args(argv)
    a.slo_ttft_s, a.slo_tpot_s = a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster = None
    if a.local:
        from deploy.local import LocalCluster

        p, d = (int(x) for x in a.local.split(","))
        cluster = LocalCluster(p, d, model=a.model, extra_worker_args=a.local_arg).start()
        address = cluster.router_address
    else:
        address = a.router
    try:
        rates = [float(x) for x in a.rates.split(",")] if a.rates else [a.rate]
        label = a.label or (f"local {a.local}" if a.local else address)
        points, cdf_runs, files = [], {}, []
        for i, rate in enumerate(rates):
            summary, records = run_once(a, address, rate, 1000 * i)
            tag = f"rate{rate:g}" if rate > 0 else f"conc{a.concurrency}"
            print_summary(f"{label} {tag}", summary)
            path = out_dir / f"{a.workload}-{tag}-seed{a.seed}.json"
            config = {k: v for k, v in vars(a).items() if k != "fn"}
            path.write_text(json.dumps({"config": config, "offered_rate": rate, "summary": summary,
                                        "records": [r.to_dict() for r in records]}, indent=1))
            files.append(path)
            points.append((rate, summary))
            cdf_runs[tag] = records
        files.append(plots.latency_cdfs(cdf_runs, out_dir / f"{a.workload}-latency_cdf.png"))
        if len(rates) > 1:
            files += plots.sweep({label: points}, out_dir)
        print("wrote " + ", ".join(str(f) for f in files))
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
