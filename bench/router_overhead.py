"""Router overhead against no-op workers: added latency (p50/p99) at a target rate, and max requests/s.

Baselines, measured in the same run: the client calling the no-op decode worker's Decode directly (one
RPC; with ``prefill_address`` set the decode worker calls the prefill worker, as in decode-driven
disaggregation). Router paths: client -> router -> decode -> prefill (``Complete``, and ``Generate``
streamed), and client -> router -> decode with conditional disaggregation (decode-local prefill).
``passthrough`` is the floor for any Python router: a gRPC servicer that forwards each request with no
validation, routing, metrics or failover (one more grpc.aio hop and nothing else).

Paths are measured in interleaved rounds, so load from other processes on the box hits all of them alike.
"hop CPU" is the CPU time (user + system) the router (or pass-through) process spent per request.

    python -m bench.router_overhead --rate 500 --num-requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc


def spawn(args: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-u", "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("PDSERVE_READY"):
            return p, line.split()[2]
    raise RuntimeError(f"{args} did not start")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc); 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


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


# path name -> (what it measures, baseline path it is compared with)
PATHS = {
    "direct_decode": ("client -> decode (direct)", None),
    "direct_decode_prefill": ("client -> decode -> prefill (direct)", None),
    "passthrough": ("client -> pass-through -> decode -> prefill (floor)", "direct_decode_prefill"),
    "router": ("client -> router -> decode -> prefill", "direct_decode_prefill"),
    "router_stream": ("same, Generate (streamed)", "direct_decode_prefill"),
    "router_local_prefill": ("client -> router -> decode (local prefill)", "direct_decode"),
}


async def measure(addrs: dict[str, str], pids: dict[str, int], rate: float, n: int, conc: int, rounds: int) -> dict:
    """``addrs``: decode, prefill, router, local_router[, passthrough]; ``pids``: the hop process per path."""
    prefill = addrs["prefill"]
    req = pb.GenerateRequest(token_ids=list(range(3, 67)), sampling=pb.SamplingParams(max_tokens=1))
    dreq = pb.DecodeRequest(request_id="x", token_ids=list(range(3, 67)), sampling=pb.SamplingParams(max_tokens=1))
    dreq_p = pb.DecodeRequest()
    dreq_p.CopyFrom(dreq)
    dreq_p.prefill_address = prefill
    channels = {k: grpc.aio.insecure_channel(addrs[k]) for k in ("decode", "router", "local_router", "passthrough")
                if k in addrs}
    try:
        dec = pb_grpc.DecodeStub(channels["decode"])
        gen, lgen = pb_grpc.GenerationStub(channels["router"]), pb_grpc.GenerationStub(channels["local_router"])

        async def direct():
            async for _ in dec.Decode(dreq, timeout=10):
                pass

        async def direct_prefill():
            async for _ in dec.Decode(dreq_p, timeout=10):
                pass

        async def routed():
            await gen.Complete(req, timeout=10)

        async def routed_stream():
            async for _ in gen.Generate(req, timeout=10):
                pass

        async def routed_local():
            await lgen.Complete(req, timeout=10)

        fns = {"direct_decode": direct, "direct_decode_prefill": direct_prefill}
        if "passthrough" in channels:
            pgen = pb_grpc.GenerationStub(channels["passthrough"])

            async def passthrough():
                await pgen.Complete(req, timeout=10)

            fns["passthrough"] = passthrough
        fns.update(router=routed, router_stream=routed_stream, router_local_prefill=routed_local)

        lat: dict[str, list[float]] = {name: [] for name in fns}
        achieved: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, float] = dict.fromkeys(fns, 0.0)
        for fn in fns.values():
            await open_loop(fn, rate, min(200, n))  # warm-up
        per_round = max(1, n // rounds)
        for r in range(rounds):  # interleaved: a noisy neighbour hits every path alike
            for name, fn in fns.items():
                c0 = cpu_seconds(pids[name]) if name in pids else 0.0
                got, rps = await open_loop(fn, rate, per_round, seed=r)
                if name in pids:
                    cpu[name] += cpu_seconds(pids[name]) - c0
                lat[name] += got
                achieved[name].append(rps)
        out = {}
        for name, fn in fns.items():
            xs = lat[name]
            out[name] = {
                "p50_ms": statistics.median(xs) * 1e3, "p90_ms": pct(xs, 0.9) * 1e3, "p99_ms": pct(xs, 0.99) * 1e3,
                "achieved_rps": statistics.mean(achieved[name]), "max_rps": await closed_loop(fn, conc, n),
            }
            if name in pids:
                out[name]["hop_cpu_ms"] = cpu[name] / len(xs) * 1e3
        for name, r in out.items():
            base = PATHS[name][1]
            if base:
                r["added_p50_ms"] = r["p50_ms"] - out[base]["p50_ms"]
                r["added_p99_ms"] = r["p99_ms"] - out[base]["p99_ms"]
        return out
    finally:
        for ch in channels.values():
            await ch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--num-requests", type=int, default=2000, help="per path, split over the rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--no-floor", action="store_true", help="skip the pass-through (floor) path")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    procs = []
    load0 = os.getloadavg()
    try:
        p, prefill = spawn(["pdserve.bench.noop_workers", "--role", "prefill"])
        procs.append(p)
        p, decode = spawn(["pdserve.bench.noop_workers", "--role", "decode"])
        procs.append(p)
        addrs = {"prefill": prefill, "decode": decode}
        pids = {}
        if not a.no_floor:
            p, addrs["passthrough"] = spawn(["pdserve.bench.noop_workers", "--role", "proxy", "--decode", decode,
                                             "--prefill", prefill])
            procs.append(p)
            pids["passthrough"] = p.pid
        common = ["pdserve", "router", "--prefill", prefill, "--decode", decode]
        p, addrs["router"] = spawn([*common, "--local-prefill-tokens", "0"])
        procs.append(p)
        pids["router"] = pids["router_stream"] = p.pid
        p, addrs["local_router"] = spawn([*common, "--local-prefill-tokens", "100000"])
        procs.append(p)
        pids["router_local_prefill"] = p.pid
        time.sleep(1.0)
        res = asyncio.run(measure(addrs, pids, a.rate, a.num_requests, a.concurrency, a.rounds))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    load1 = os.getloadavg()
    print(f"router overhead vs a no-op engine, {a.num_requests} requests per path at {a.rate:g} req/s (Poisson) in "
          f"{a.rounds} interleaved rounds; max rps closed-loop at concurrency {a.concurrency}; "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print("added = path minus its direct baseline (the same worker calls made by the client), same run")
    print(f"{'path':24} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10} "
          f"{'hop CPU ms':>11} {'max rps':>8}")
    for name, r in res.items():
        added50 = f"{r['added_p50_ms']:10.2f}" if "added_p50_ms" in r else f"{'':10}"
        added99 = f"{r['added_p99_ms']:10.2f}" if "added_p99_ms" in r else f"{'':10}"
        hop = f"{r['hop_cpu_ms']:11.2f}" if "hop_cpu_ms" in r else f"{'':11}"
        print(f"{name:24} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {added50} {added99} {hop} "
              f"{r['max_rps']:8.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rate": a.rate, "num_requests": a.num_requests, "rounds": a.rounds,
                       "load_average": [load0[0], load1[0]], "paths": res}, f, indent=2)


if __name__ == "__main__":
    main()
