"""Fault injection under load: each fault against fault-free greedy outputs, then every surviving worker's
block pool is checked (integrity + no block held by a finished request).

    python -m bench.chaos --requests 24
    python -m bench.chaos --requests 24 --faults cut      # only the faults whose name contains "cut"

Faults: kill -9 a decode worker mid-stream; kill -9 a prefill worker mid-prefill; kill a router replica
(clients retry on the other); SIGSTOP a decode worker past the clients' deadline; SIGSTOP a decode worker with
the clients' deadline far off (the router finds it hung and moves its requests); cut every 3rd KV transfer
connection in the middle of a frame (``--debug-kv-cut-every``). Prints, per fault:
requests in flight, completed correctly, failed by status, blocks leaked, router retries, and (cut fault) KV
transfers failed and KV transfers re-sent on a new connection (read from the prefill workers' metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
import urllib.request
from dataclasses import dataclass, field

import grpc

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import worker_channel

MAX_TOKENS = 24


@dataclass
class FaultResult:
    fault: str
    in_flight: int = 0
    correct: int = 0
    wrong: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    leaked_blocks: int = 0
    kv_failures: int = 0  # cut fault: KV transfers that failed (read from the prefill workers' metrics)
    kv_resends: int = 0  # cut fault: KV transfers re-sent on a new connection after the cut (same)
    retries: int = 0  # attempts the router retried on another worker (its metrics)
    integrity_errors: list[str] = field(default_factory=list)


def workload(n: int) -> list[list[int]]:
    return [[3 + (i * 37 + j * 11) % 250 for j in range(40 + (i * 13) % 120)] for i in range(n)]


def expected(prompts) -> list[list[int]]:
    from pdserve import LLM, SamplingParams

    outs = LLM("tiny").generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]


def _req(p) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=p, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                      ignore_eos=True))


async def _stream(address: str, req, timeout: float):
    async with grpc.aio.insecure_channel(address) as ch:
        return [t for r in await _collect(pb_grpc.GenerationStub(ch).Generate(req, timeout=timeout)) for t in r.token_ids]


async def _collect(call):
    return [r async for r in call]


async def drive(addresses: list[str], prompts, timeout: float, on_started) -> list:
    """Send all prompts concurrently (client i uses addresses[i % n], retrying once on the next address if
    its router is gone); call on_started() once tokens flow. Returns token lists or status names."""
    started = asyncio.Event()

    async def one(i, p):
        order = addresses[i % len(addresses):] + addresses[: i % len(addresses)]
        got: list[int] = []
        for k, addr in enumerate(order):
            try:
                async with grpc.aio.insecure_channel(addr) as ch:
                    # a retry continues from what already arrived: prompt + received tokens, fewer to go
                    req = _req(p + got)
                    req.sampling.max_tokens = MAX_TOKENS - len(got)
                    async for r in pb_grpc.GenerationStub(ch).Generate(req, timeout=timeout):
                        got += r.token_ids
                        started.set()
                    return got
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and k + 1 < len(order):
                    continue  # that router is gone: the client retries on another replica
                return e.code().name
        return "UNAVAILABLE"

    async def trigger():
        await started.wait()
        await asyncio.sleep(0.15)
        await asyncio.to_thread(on_started)

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)), trigger())
    return results[:-1]


def leak_check(cluster: LocalCluster, settle_s: float = 5.0) -> tuple[int, list[str]]:
    """(blocks still held by live requests, integrity errors) over every surviving worker, after letting
    in-flight cleanup settle for up to ``settle_s`` per worker."""
    async def load(addr, role):
        async with worker_channel(addr, cluster.secret, "chaos") as ch:
            stub = pb_grpc.PrefillStub(ch) if role == "prefill" else pb_grpc.DecodeStub(ch)
            return await stub.GetLoad(pb.LoadRequest(check_integrity=True), timeout=5)

    leaked, errors = 0, []
    for p in cluster.procs:
        if p.role not in ("prefill", "decode") or p.popen.poll() is not None:
            continue
        deadline = time.monotonic() + settle_s
        while True:
            ld = asyncio.run(load(p.address, p.role))
            if ld.num_live_blocks == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        leaked += ld.num_live_blocks
        if ld.integrity_error:
            errors.append(f"{p.role} {p.address}: {ld.integrity_error}")
    return leaked, errors


def check_workers(cluster: LocalCluster, res: FaultResult, settle_s: float = 5.0) -> None:
    leaked, errors = leak_check(cluster, settle_s)
    res.leaked_blocks += leaked
    res.integrity_errors += errors


def metric_total(port: int, name: str) -> float:
    """Sum of a Prometheus counter (all label sets) read from a process's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def count_faults(cluster: LocalCluster, res: FaultResult) -> None:
    for p in cluster.procs:
        if p.popen.poll() is None and p.metrics_port:
            if p.role == "prefill":
                res.kv_failures += int(metric_total(p.metrics_port, "pdserve_kv_transfer_failures_total"))
                res.kv_resends += int(metric_total(p.metrics_port, "pdserve_kv_transfer_resends_total"))
            elif p.role == "router":
                res.retries += int(metric_total(p.metrics_port, "pdserve_router_retries_total"))


def tally(res: FaultResult, results, want) -> FaultResult:
    res.in_flight = len(results)
    for r, w in zip(results, want, strict=True):
        if isinstance(r, str):
            res.failed[r] = res.failed.get(r, 0) + 1
        elif r == w:
            res.correct += 1
        else:
            res.wrong += 1
    return res


def _kill(proc, sig=signal.SIGKILL) -> None:
    os.kill(proc.popen.pid, sig)


def run_fault(name: str, prompts, want, delay_ms: int = 20) -> FaultResult:
    res = FaultResult(name)
    args = ["--debug-step-delay-ms", str(delay_ms)]
    router = ["--local-prefill-tokens", "0"]
    if name == "kill -9 decode mid-stream":
        with LocalCluster(1, 2, policy="round_robin", extra_worker_args=args, router_args=router) as c:
            results = asyncio.run(drive([c.router_address], prompts, 60, lambda: _kill(c.workers("decode")[0])))
            check_workers(c, tally(res, results, want))
    elif name == "kill -9 prefill mid-prefill":
        with LocalCluster(2, 1, policy="round_robin", extra_worker_args=args, router_args=router) as c:
            results = asyncio.run(drive([c.router_address], prompts, 60, lambda: _kill(c.workers("prefill")[0])))
            check_workers(c, tally(res, results, want))
    elif name == "kill a router replica":
        with LocalCluster(1, 1, extra_worker_args=args, router_args=router) as c:
            other = c.add_router()
            first = next(p for p in c.procs if p.role == "router")
            results = asyncio.run(drive([first.address, other.address], prompts, 60, lambda: _kill(first)))
            check_workers(c, tally(res, results, want))
    elif name == "SIGSTOP decode past the deadline":
        with LocalCluster(1, 2, policy="round_robin", extra_worker_args=args, router_args=router) as c:
            victim = c.workers("decode")[0]

            def stall():
                _kill(victim, signal.SIGSTOP)

            results = asyncio.run(drive([c.router_address], prompts, 3.0, stall))
            time.sleep(0.5)
            _kill(victim, signal.SIGCONT)
            time.sleep(1.0)
            check_workers(c, tally(res, results, want))
    elif name == "SIGSTOP decode mid-stream, moved":
        # the deadline is far off: the router finds the stopped worker hung (its health polls time out) and moves its
        # requests to the other decode worker; the stopped one, once continued, frees what they held
        with LocalCluster(1, 2, policy="round_robin", extra_worker_args=args, router_args=router) as c:
            victim = c.workers("decode")[0]
            results = asyncio.run(drive([c.router_address], prompts, 60, lambda: _kill(victim, signal.SIGSTOP)))
            _kill(victim, signal.SIGCONT)
            check_workers(c, tally(res, results, want))
    elif name == "cut KV connection mid-transfer":
        # every 3rd transfer a prefill worker sends is cut in the middle of a frame (injected in kvtransfer)
        cut = [*args, "--debug-kv-cut-every", "3", "--metrics-port", "-1"]
        with LocalCluster(2, 1, policy="round_robin", extra_worker_args=cut,
                          router_args=[*router, "--metrics-port", "-1"]) as c:
            results = asyncio.run(drive([c.router_address], prompts, 60, lambda: None))
            check_workers(c, tally(res, results, want))
            count_faults(c, res)
    else:
        raise ValueError(f"unknown fault {name!r}")
    return res


FAULTS = ["kill -9 decode mid-stream", "kill -9 prefill mid-prefill", "kill a router replica",
          "SIGSTOP decode past the deadline", "SIGSTOP decode mid-stream, moved", "cut KV connection mid-transfer"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--faults", default="", help="run only the faults whose name contains this (e.g. cut)")
    a = ap.parse_args()
    faults = [f for f in FAULTS if a.faults in f]
    if not faults:
        ap.error(f"--faults: no fault name contains {a.faults!r}; faults: {FAULTS}")
    prompts = workload(a.requests)
    want = expected(prompts)
    rows = [run_fault(f, prompts, want) for f in faults]
    print(f"{'fault':36} {'in flight':>9} {'correct':>8} {'wrong':>6} {'failed (status)':24} {'leaked blocks':>13}"
          f" {'retries':>7} {'kv fail':>7} {'kv resent':>9}")
    for r in rows:
        failed = ", ".join(f"{v} {k}" for k, v in r.failed.items()) or "0"
        print(f"{r.fault:36} {r.in_flight:9d} {r.correct:8d} {r.wrong:6d} {failed:24} {r.leaked_blocks:13d}"
              f" {r.retries:7d} {r.kv_failures:7d} {r.kv_resends:9d}"
              + (f"  INTEGRITY: {r.integrity_errors}" if r.integrity_errors else ""))


if __name__ == "__main__":
    main()
