"""Router overhead against no-op workers: added latency (p50/p99) at a target rate, and max requests/s.

Baseline, measured in the same run: the client calling the no-op decode worker's Decode directly (one
RPC). Router path: client -> router -> (Reserve, Prefill, Decode) on no-op workers -> client; and the
router path with conditional disaggregation (decode-local prefill: one internal RPC).

    python -m bench.router_overhead --rate 500 --num-requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time

import grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc


def spawn(args: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-u", "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("PDSERVE_READY"):
            return p, line.split()[2]
    raise RuntimeError(f"{args} did not start")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def open_loop(call, rate: float, n: int, seed: int = 0) -> tuple[list[float], float]:
    """Poisson arrivals at ``rate``; returns latencies (s) and achieved completions/s."""
    rng = random.Random(seed)
    lat: list[float] = []

    async def one():
        t = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    tasks, t_next = [], t0
    for _ in range(n):
        t_next += rng.expovariate(rate)
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    return lat, n / (time.perf_counter() - t0)


async def closed_loop(call, concurrency: int, n: int) -> float:
    done = 0

    async def worker():
        nonlocal done
        while done < n:
            done += 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def measure(router: str, local_router: str, decode: str, prefill: str, rate: float, n: int, conc: int) -> dict:
    req = pb.GenerateRequest(token_ids=list(range(3, 67)), sampling=pb.SamplingParams(max_tokens=1))
    dreq = pb.DecodeRequest(request_id="x", token_ids=list(range(3, 67)), sampling=pb.SamplingParams(max_tokens=1))
    dreq_p = pb.DecodeRequest()
    dreq_p.CopyFrom(dreq)
    dreq_p.prefill_address = prefill
    out = {}
    async with grpc.aio.insecure_channel(router) as rc, grpc.aio.insecure_channel(local_router) as lc, \
            grpc.aio.insecure_channel(decode) as dc:
        gen, lgen, dec = pb_grpc.GenerationStub(rc), pb_grpc.GenerationStub(lc), pb_grpc.DecodeStub(dc)

        async def direct():
            async for _ in dec.Decode(dreq, timeout=10):
                pass

        async def direct_prefill():
            async for _ in dec.Decode(dreq_p, timeout=10):
                pass

        async def routed():
            await gen.Complete(req, timeout=10)

        async def routed_local():
            await lgen.Complete(req, timeout=10)

        paths = (("direct_decode", direct), ("direct_decode_prefill", direct_prefill), ("router", routed),
                 ("router_local_prefill", routed_local))
        for name, fn in paths:
            await open_loop(fn, rate, min(200, n))  # warm-up
            lat, achieved = await open_loop(fn, rate, n)
            out[name] = {
                "p50_ms": statistics.median(lat) * 1e3, "p90_ms": pct(lat, 0.9) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
                "achieved_rps": achieved, "max_rps": await closed_loop(fn, conc, n),
            }
    for name, base in (("router", "direct_decode_prefill"), ("router_local_prefill", "direct_decode")):
        out[name]["added_p50_ms"] = out[name]["p50_ms"] - out[base]["p50_ms"]
        out[name]["added_p99_ms"] = out[name]["p99_ms"] - out[base]["p99_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    procs = []
    try:
        p, prefill = spawn(["bench.noop_workers", "--role", "prefill"])
        procs.append(p)
        p, decode = spawn(["bench.noop_workers", "--role", "decode"])
        procs.append(p)
        common = ["deploy.cli", "router", "--prefill", prefill, "--decode", decode]
        p, router = spawn([*common, "--local-prefill-tokens", "0"])
        procs.append(p)
        p, local_router = spawn([*common, "--local-prefill-tokens", "100000"])
        procs.append(p)
        time.sleep(1.0)
        res = asyncio.run(measure(router, local_router, decode, prefill, a.rate, a.num_requests, a.concurrency))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print(f"router overhead vs a no-op engine, {a.num_requests} requests at {a.rate:g} req/s (Poisson), "
          f"max rps closed-loop at concurrency {a.concurrency}")
    print("added = router path minus the same worker calls made directly (decode-driven prefill / local)")
    print(f"{'path':24} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10} {'max rps':>8}")
    for name, r in res.items():
        print(f"{name:24} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {r.get('added_p50_ms', 0):10.2f} "
              f"{r.get('added_p99_ms', 0):10.2f} {r['max_rps']:8.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
