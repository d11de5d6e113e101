"""What the OpenAI-compatible gateway adds: the same completion through gRPC and through HTTP, side by side.

A real router and a real gateway (``pdserve router``, ``pdserve gateway``) in front of no-op workers, so the
difference is the gateway hop and nothing the model does. Paths, measured one request at a time in
interleaved rounds (a noisy neighbour hits both alike):

- ``grpc``: client -> router ``Complete`` (string prompt, ``max_tokens`` 1);
- ``http``: client -> gateway ``POST /v1/completions`` (same prompt) -> router ``Complete``;
- ``grpc_stream`` / ``http_stream``: the same through ``Generate`` and ``stream: true`` (SSE).

``added_p50_ms`` is the HTTP path's p50 minus the gRPC path's, client included (aiohttp's client against
grpc.aio's). "gateway CPU" is the gateway process's CPU time (user + system) per HTTP request.

    python -m bench.gateway_overhead --num-requests 1000 --json /tmp/gateway_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import aiohttp
import grpc

from pdserve.bench.router_overhead import cpu_seconds, pct, spawn
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
PATHS = {"grpc": None, "http": "grpc", "grpc_stream": None, "http_stream": "grpc_stream"}


async def measure(router: str, base_url: str, gateway_pid: int, n: int, rounds: int, warmup: int) -> dict:
    req = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=1), model="tiny")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1}
    stream_body = {**body, "stream": True}
    async with grpc.aio.insecure_channel(router) as ch, aiohttp.ClientSession() as http:
        gen = pb_grpc.GenerationStub(ch)

        async def grpc_unary():
            await gen.Complete(req, timeout=10)

        async def grpc_stream():
            async for _ in gen.Generate(req, timeout=10):
                pass

        async def http_unary():
            async with http.post(base_url + "/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()

        async def http_stream():
            async with http.post(base_url + "/completions", json=stream_body) as r:
                assert r.status == 200, await r.text()
                async for _ in r.content:
                    pass

        fns = {"grpc": grpc_unary, "http": http_unary, "grpc_stream": grpc_stream, "http_stream": http_stream}
        lat: dict[str, list[float]] = {k: [] for k in fns}
        cpu = dict.fromkeys(fns, 0.0)
        for fn in fns.values():
            for _ in range(warmup):
                await fn()
        per_round = max(1, n // rounds)
        for _ in range(rounds):
            for name, fn in fns.items():
                c0 = cpu_seconds(gateway_pid)
                for _ in range(per_round):
                    t = time.perf_counter()
                    await fn()
                    lat[name].append(time.perf_counter() - t)
                cpu[name] += cpu_seconds(gateway_pid) - c0
    out = {}
    for name, xs in lat.items():
        out[name] = {"p50_ms": statistics.median(xs) * 1e3, "p90_ms": pct(xs, 0.9) * 1e3,
                     "p99_ms": pct(xs, 0.99) * 1e3, "num_requests": len(xs)}
        if name.startswith("http"):
            out[name]["gateway_cpu_ms"] = cpu[name] / len(xs) * 1e3
    for name, base in PATHS.items():
        if base:
            out[name]["added_p50_ms"] = out[name]["p50_ms"] - out[base]["p50_ms"]
            out[name]["added_p99_ms"] = out[name]["p99_ms"] - out[base]["p99_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000, help="per path, split over the rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    ap.add_argument("--warmup", type=int, default=50, help="requests per path before measuring")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    procs = []
    load0 = os.getloadavg()
    try:
        p, prefill = spawn(["pdserve.bench.noop_workers", "--role", "prefill"])
        procs.append(p)
        p, decode = spawn(["pdserve.bench.noop_workers", "--role", "decode"])
        procs.append(p)
        p, router = spawn(["pdserve", "router", "--model", "tiny", "--prefill", prefill, "--decode", decode,
                           "--port", "0"])
        procs.append(p)
        p, gateway = spawn(["pdserve", "gateway", "--router", router, "--port", "0"])
        procs.append(p)
        time.sleep(1.0)  # first load poll
        res = asyncio.run(measure(router, f"http://{gateway}/v1", p.pid, a.num_requests, a.rounds, a.warmup))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    res["meta"] = {"num_cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                   "rounds": a.rounds}
    print(f"{'path':<12} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'added p50':>10} {'gateway CPU ms':>15}")
    for name in PATHS:
        r = res[name]
        added = f"{r['added_p50_ms']:+.3f}" if "added_p50_ms" in r else ""
        cpu = f"{r['gateway_cpu_ms']:.3f}" if "gateway_cpu_ms" in r else ""
        print(f"{name:<12} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} {r['p99_ms']:8.3f} {added:>10} {cpu:>15}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
