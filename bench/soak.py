"""Bounded soak: measure the cluster's capacity, then hold a fraction of it (default 80 %) for minutes while
sampling every process's resident memory; end with a leak and integrity check of every worker.

    python -m bench.soak --duration 300 --warmup 60          # the long run (bench/RESULTS.md)
    python -m bench.soak --duration 25 --warmup 8            # fast form (tests/reliability/test_soak.py)

Capacity = requests/s completed by a closed loop at --concurrency over --capacity-s seconds (same workload
shape). The soak is open loop (Poisson) at --load x capacity. RSS growth per process = median RSS over the
last window minus median RSS over the first window after warm-up, over the latter (a window is
max(5 s, duration/10)). Reported: that growth (worst process), error rate by status, blocks still held by
finished requests, block-pool integrity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

from pdserve.bench.arrivals import poisson_arrivals
from pdserve.bench.chaos import leak_check
from pdserve.bench.client import run_closed_loop, run_open_loop
from pdserve.bench.metrics import summarize
from pdserve.bench.workloads import uniform
from pdserve.deploy.local import LocalCluster

PAGE_KIB = 4


def rss_kib(pid: int) -> int:
    """Resident set size of a live process, KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (OSError, ValueError, IndexError):
        return 0


class RssSampler:
    """Samples the RSS of named processes every ``interval_s`` on a thread until stopped."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.5):
        self.pids = pids
        self.interval_s = interval_s
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self.t0
            for name, pid in self.pids.items():
                if kib := rss_kib(pid):
                    self.samples[name].append((now, kib))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def rss_growth(samples: list[tuple[float, int]], start_s: float, end_s: float, window_s: float) -> dict:
    """Median RSS over [start, start+window] and over [end-window, end], and the growth between them (%)."""
    first = [k for t, k in samples if start_s <= t <= start_s + window_s]
    last = [k for t, k in samples if end_s - window_s <= t <= end_s]
    if not first or not last:
        raise ValueError("rss_growth: no samples in a window; run longer or sample more often")
    a, b = statistics.median(first), statistics.median(last)
    return {"start_kib": a, "end_kib": b, "growth_pct": 100.0 * (b - a) / a}


@dataclass
class SoakResult:
    capacity_rps: float
    offered_rps: float
    duration_s: float
    warmup_s: float
    num_requests: int = 0
    num_ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_rate: float = 0.0
    achieved_rps: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    rss: dict[str, dict] = field(default_factory=dict)
    max_rss_growth_pct: float = 0.0
    leaked_blocks: int = 0
    integrity_errors: list[str] = field(default_factory=list)


def workload(n: int, seed: int, max_prompt: int, output_len: int):
    return uniform(n, (8, max_prompt), output_len, seed=seed)


def soak(cluster: LocalCluster, duration_s: float, warmup_s: float, load: float = 0.8, capacity_s: float = 10.0,
         concurrency: int = 8, max_prompt: int = 256, output_len: int = 16, timeout_s: float = 60.0,
         seed: int = 0) -> SoakResult:
    if not 0 < load <= 1.5:
        raise ValueError(f"load: must be in (0, 1.5], got {load}")
    if not 0 <= warmup_s < duration_s:
        raise ValueError(f"warmup_s: must be in [0, duration_s), got {warmup_s}")
    addr = cluster.router_address
    cap_reqs = workload(int(capacity_s * 200), seed + 1, max_prompt, output_len)
    cap = asyncio.run(run_closed_loop(addr, cap_reqs, concurrency, capacity_s, timeout_s, progress=False,
                                      id_prefix="cap"))
    capacity = sum(r.ok for r in cap) / max(1e-9, max(r.end_time for r in cap))
    rate = load * capacity
    n = int(rate * duration_s * 1.5) + 10
    reqs = workload(n, seed, max_prompt, output_len)
    send_at = poisson_arrivals(rate, n, seed)
    pids = {f"{p.role}{i}": p.popen.pid for i, p in enumerate(cluster.procs)}
    with RssSampler(pids) as sampler:
        records = asyncio.run(run_open_loop(addr, reqs, send_at, duration_s, timeout_s, progress=False,
                                            id_prefix="soak"))
        end_s = time.monotonic() - sampler.t0
    summary = summarize(records)
    res = SoakResult(capacity, rate, duration_s, warmup_s, num_requests=summary["num_requests"],
                     num_ok=summary["num_ok"], errors=summary["errors"],
                     achieved_rps=summary["throughput"]["requests_per_s"],
                     ttft_p50_s=summary["ttft_s"]["p50"] or 0.0, ttft_p99_s=summary["ttft_s"]["p99"] or 0.0)
    res.error_rate = 1 - res.num_ok / res.num_requests if res.num_requests else 1.0
    window = max(5.0, duration_s / 10)
    for name, samples in sampler.samples.items():
        res.rss[name] = rss_growth(samples, warmup_s, min(end_s, duration_s), window)
    res.max_rss_growth_pct = max(v["growth_pct"] for v in res.rss.values())
    res.leaked_blocks, res.integrity_errors = leak_check(cluster)
    return res


def report(r: SoakResult) -> str:
    lines = [
        f"capacity {r.capacity_rps:.2f} req/s (closed loop); offered {r.offered_rps:.2f} req/s for "
        f"{r.duration_s:g} s (warm-up {r.warmup_s:g} s); achieved {r.achieved_rps:.2f} req/s",
        f"requests {r.num_requests}, ok {r.num_ok}, error rate {100 * r.error_rate:.2f} % {r.errors or ''}",
        f"TTFT p50 {1000 * r.ttft_p50_s:.0f} ms, p99 {1000 * r.ttft_p99_s:.0f} ms",
        f"{'process':10} {'RSS after warm-up (MiB)':>24} {'RSS at end (MiB)':>17} {'growth':>8}",
    ]
    for name, v in r.rss.items():
        lines.append(f"{name:10} {v['start_kib'] / 1024:24.1f} {v['end_kib'] / 1024:17.1f} {v['growth_pct']:7.2f}%")
    lines.append(f"max RSS growth {r.max_rss_growth_pct:.2f} % (goal < 5 %); leaked blocks {r.leaked_blocks}"
                 f"{'; INTEGRITY: ' + '; '.join(r.integrity_errors) if r.integrity_errors else ''}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300.0, help="soak seconds")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the first RSS window")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity to offer")
    ap.add_argument("--capacity-s", type=float, default=15.0, help="seconds of closed loop to measure capacity")
    ap.add_argument("--concurrency", type=int, default=8, help="closed loop concurrency for the capacity run")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers")
    ap.add_argument("--decode", type=int, default=1, help="decode workers")
    ap.add_argument("--max-prompt", type=int, default=256, help="prompt lengths uniform in [8, this]")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--out", default="", help="write the result as JSON here")
    a = ap.parse_args()
    with LocalCluster(a.prefill, a.decode, router_args=["--local-prefill-tokens", "16"]) as c:
        r = soak(c, a.duration, a.warmup, a.load, a.capacity_s, a.concurrency, a.max_prompt, a.output_len)
    print(report(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(asdict(r), f, indent=2)


if __name__ == "__main__":
    main()
