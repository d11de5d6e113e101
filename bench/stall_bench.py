"""Does one client stall everyone? The p99 latency of small requests, alone and while 4 MB prompts keep arriving.

    python -m pdserve.bench.stall_bench                       # starts a local cluster (1 prefill, 1 decode, tiny)
    python -m pdserve.bench.stall_bench --router HOST:PORT    # an existing cluster (--api-key if it needs one)

Two phases of ``--duration`` seconds each, ``--rounds`` times interleaved, over the public API only. Both run
``--concurrency`` closed-loop clients sending small requests (a short prompt, ``--max-tokens`` tokens); the
second phase adds ``--big-senders`` clients, in a process of their own, that each send a ``--big-mb`` MB prompt
every ``--big-interval`` seconds (0: back to back, a flood of ~200 MB/s on a small box). Prints each phase's
small-request p50/p99 and the ratio of the p99s (issue 15's goal: at most 1.5), and what the big prompts got. Before the router tokenized off its
event loop, one 4 MB prompt stalled every other request for ~5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import bearer

SMALL_PROMPT = "Hello, how are you today?"


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def _small_client(stub, metadata, max_tokens: int, until: float, out: list[float], errors: list[str]) -> None:
    req = pb.GenerateRequest(prompt=SMALL_PROMPT, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            await stub.Complete(req, timeout=120, metadata=metadata)
            out.append(time.monotonic() - t0)
        except grpc.aio.AioRpcError as e:
            errors.append(e.code().name)


async def _big_client(stub, metadata, prompt: str, until: float, codes: list[str], seconds: list[float],
                      interval_s: float) -> None:
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=1))
    next_t = time.monotonic()
    while next_t < until:
        await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        t0 = time.monotonic()
        next_t = max(next_t + interval_s, t0)
        try:
            await stub.Complete(req, timeout=120, metadata=metadata)
            codes.append("OK")
        except grpc.aio.AioRpcError as e:
            codes.append(e.code().name)
        seconds.append(time.monotonic() - t0)


async def _bigs(address: str, api_key: str, a: argparse.Namespace, until: float) -> tuple[list[str], list[float]]:
    big_prompt = ("The quick brown fox jumps over the lazy dog. " * (a.big_mb * 1024 * 1024 // 45 + 1))[
        : a.big_mb * 1024 * 1024]
    codes: list[str] = []
    seconds: list[float] = []
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(address, options=options) as ch:
        stub = pb_grpc.GenerationStub(ch)
        await asyncio.gather(*(_big_client(stub, bearer(api_key), big_prompt, until, codes, seconds, a.big_interval)
                               for _ in range(a.big_senders)))
    return codes, seconds


def _big_process(address: str, api_key: str, a: argparse.Namespace, until_wall: float, out) -> None:
    """The big senders, in a process of their own: the attacker is another client, not this one's event loop."""
    until = time.monotonic() + (until_wall - time.time())
    out.put(asyncio.run(_bigs(address, api_key, a, until)))


async def phase(address: str, api_key: str, a: argparse.Namespace, big_senders: int) -> dict:
    import multiprocessing

    metadata = bearer(api_key)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        for _ in range(3):  # warm-up
            await stub.Complete(pb.GenerateRequest(prompt=SMALL_PROMPT, sampling=pb.SamplingParams(max_tokens=1)),
                                timeout=120, metadata=metadata)
        lat: list[float] = []
        errors: list[str] = []
        codes: list[str] = []
        big_s: list[float] = []
        proc, results = None, None
        if big_senders:
            ctx = multiprocessing.get_context("spawn")
            results = ctx.Queue()
            proc = ctx.Process(target=_big_process, args=(address, api_key, a, time.time() + 2.0 + a.duration, results))
            proc.start()
            await asyncio.sleep(2.0)  # the sender process starts up
        until = time.monotonic() + a.duration
        t0 = time.monotonic()
        await asyncio.gather(*(_small_client(stub, metadata, a.max_tokens, until, lat, errors)
                               for _ in range(a.concurrency)))
        wall = time.monotonic() - t0
        if proc is not None:
            codes, big_s = await asyncio.to_thread(results.get, True, 300)
            proc.join(30)
    return {"big_senders": big_senders, "lat": lat, "errors": errors, "codes": codes, "big_s": big_s, "wall_s": wall}


def summarize(phases: list[dict]) -> dict:
    lat = [x for p in phases for x in p["lat"]]
    codes = [c for p in phases for c in p["codes"]]
    big_s = [x for p in phases for x in p["big_s"]]
    return {
        "big_senders": phases[0]["big_senders"], "num_small": len(lat),
        "small_errors": [e for p in phases for e in p["errors"]], "wall_s": sum(p["wall_s"] for p in phases),
        "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3, "max_ms": max(lat, default=0) * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        "big_prompts": len(codes), "big_codes": sorted(set(codes)),
        "big_p50_ms": percentile(big_s, 50) * 1e3 if big_s else float("nan"),
        "p99_ms_by_round": [percentile(p["lat"], 99) * 1e3 for p in phases],
    }


def run(address: str, a: argparse.Namespace) -> dict:
    """``--rounds`` rounds of (alone, with big prompts), interleaved so that a change in the box's background load
    falls on both phases alike."""
    alone, flood = [], []
    for _ in range(a.rounds):
        alone.append(asyncio.run(phase(address, a.api_key, a, 0)))
        flood.append(asyncio.run(phase(address, a.api_key, a, a.big_senders)))
    alone_s, flood_s = summarize(alone), summarize(flood)
    return {"alone": alone_s, "with_big_prompts": flood_s, "p99_ratio": flood_s["p99_ms"] / alone_s["p99_ms"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.stall_bench", description=__doc__.split("\n")[0])
    p.add_argument("--router", default="", help="router host:port (default: start a local cluster)")
    p.add_argument("--api-key", default="", help="API key for a router that needs one")
    p.add_argument("--model", default="tiny", help="local cluster's model")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (alone, with big prompts), interleaved")
    p.add_argument("--concurrency", type=int, default=4, help="small-request clients")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens per small request")
    p.add_argument("--big-senders", type=int, default=4, help="clients sending big prompts back to back")
    p.add_argument("--big-mb", type=int, default=4, help="size of a big prompt, MB")
    p.add_argument("--big-interval", type=float, default=1.0,
                   help="seconds between one sender's big prompts (0: back to back)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    if a.router:
        result = run(a.router, a)
    else:
        from pdserve.deploy.local import LocalCluster

        with LocalCluster(1, 1, model=a.model) as c:
            result = run(c.router_address, a)
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    for name in ("alone", "with_big_prompts"):
        r = result[name]
        print(f"{name:<17} small requests: {r['num_small']:>5}  p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
              f"max {r['max_ms']:8.1f} ms  errors {len(r['small_errors'])}"
              + (f"  | {r['big_prompts']} big prompts -> {','.join(r['big_codes'])}, p50 {r['big_p50_ms']:.0f} ms"
                 if r["big_senders"] else ""))
    print(f"p99 ratio (with / without big prompts): {result['p99_ratio']:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
