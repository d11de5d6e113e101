"""Churn under steady load: every second a worker is added, killed (-9), restarted or drained (SIGTERM), while a
bounded closed loop of clients keeps sending requests through the router. Every request must end before its
deadline with OK or a clean status; at the end every surviving worker's block pool is checked for leaks.

    python -m bench.churn                    # 120 s (bench/RESULTS.md)
    python -m bench.churn --seconds 15       # CI size (tests/reliability/test_churn.py)

Ends are counted per gRPC status. ``hung``: a request that did not end before its deadline (DEADLINE_EXCEEDED)
or not at all by deadline + grace (the client's own watchdog). ``unclean``: UNKNOWN, INTERNAL or DATA_LOSS (a
bug's status, not a decision). ``leaked``: blocks still held on the surviving workers after the load stopped,
plus block-pool integrity errors. Everything binds to 127.0.0.1; the worker count is capped.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from pdserve.bench.chaos import leak_check
from pdserve.deploy.local import LocalCluster, Proc, _spawn, close_output, kill_group, respawn
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

UNCLEAN = {"UNKNOWN", "INTERNAL", "DATA_LOSS"}
ACTIONS = ("add", "kill", "restart", "drain")
WATCHDOG_GRACE_S = 5.0


@dataclass
class ChurnResult:
    seconds: float
    num_requests: int = 0
    ends: Counter = field(default_factory=Counter)  # status name -> requests
    no_end: int = 0  # the client's watchdog fired: no end by deadline + grace
    hung_ids: list[str] = field(default_factory=list)  # request ids of the hung ones (the first 50)
    actions: Counter = field(default_factory=Counter)  # action -> times done
    skipped: Counter = field(default_factory=Counter)  # action -> times its bound said no
    leaked_blocks: int = 0
    integrity_errors: list[str] = field(default_factory=list)
    workers_checked: int = 0

    @property
    def hung(self) -> int:
        return self.ends.get("DEADLINE_EXCEEDED", 0) + self.no_end

    @property
    def unclean(self) -> int:
        return sum(n for s, n in self.ends.items() if s in UNCLEAN)


def workload(i: int) -> list[int]:
    return [3 + (i * 37 + j * 11) % 250 for j in range(24 + (i * 13) % 72)]


async def client_loop(address: str, stop, res: ChurnResult, deadline_s: float, max_tokens: int,
                      offset: int) -> None:
    """One client: request after request until ``stop``; each under a gRPC deadline and a watchdog."""
    i = offset
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        while not stop.is_set():
            req = pb.GenerateRequest(request_id=f"churn-{i}", token_ids=workload(i), sampling=pb.SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True))
            i += 1000
            res.num_requests += 1
            call = stub.Generate(req, timeout=deadline_s)

            async def drain(c=call) -> None:
                async for _ in c:
                    pass

            try:
                await asyncio.wait_for(drain(), deadline_s + WATCHDOG_GRACE_S)
                res.ends["OK"] += 1
            except grpc.aio.AioRpcError as e:
                res.ends[e.code().name] += 1
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    res.hung_ids.append(req.request_id)
                else:
                    await asyncio.sleep(0.05)  # a refused request: do not spin
            except TimeoutError:
                call.cancel()
                res.no_end += 1
                res.hung_ids.append(req.request_id)


def load_main(address: str, stop, conn, concurrency: int, deadline_s: float, max_tokens: int) -> None:
    """The clients, in a process of their own: the churner forks workers, and a fork while gRPC threads run in
    the forking process is unsafe. Sends back (requests, ends per status, no end)."""
    res = ChurnResult(0)

    async def main() -> None:
        await asyncio.gather(*(client_loop(address, stop, res, deadline_s, max_tokens, k)
                               for k in range(concurrency)))

    asyncio.run(main())
    conn.send((res.num_requests, dict(res.ends), res.no_end, res.hung_ids[:50]))


class Churner:
    """Applies one action a tick to the cluster's workers, within bounds: at most ``max_workers`` processes of
    each role alive, and never the last ready worker of a role killed or drained."""

    def __init__(self, cluster: LocalCluster, max_workers: int, seed: int):
        self.cluster = cluster
        self.max_workers = max_workers
        self.rng = random.Random(seed)
        self.dead: list[Proc] = []  # killed -9, waiting for a restart
        self.leaving: list[Proc] = []  # SIGTERMed, draining

    def alive(self, role: str) -> list[Proc]:
        return [p for p in self.cluster.workers(role) if p.popen.poll() is None and p not in self.leaving]

    def ready(self, role: str) -> list[Proc]:
        return [p for p in self.alive(role) if p.ready.is_set()]

    def tick(self, action: str, res: ChurnResult) -> None:
        """One action on a random role, else on the other one; skipped when the bounds allow neither."""
        roles = ["prefill", "decode"]
        self.rng.shuffle(roles)
        done = any(getattr(self, f"_{action}")(role) for role in roles)
        (res.actions if done else res.skipped)[action] += 1

    def _add(self, role: str) -> bool:
        if len(self.alive(role)) >= self.max_workers:
            return False
        args = [*self.cluster.worker_args(), "--router", self.cluster.router_address]
        self.cluster.procs.append(_spawn(role, args, self.cluster.env, self.cluster.echo))
        return True

    def _victim(self, role: str) -> Proc | None:
        ready = self.ready(role)
        return self.rng.choice(ready) if len(ready) >= 2 else None

    def _kill(self, role: str) -> bool:
        p = self._victim(role)
        if p is None:
            return False
        kill_group(p, signal.SIGKILL)
        p.popen.wait(5)
        self.dead.append(p)
        return True

    def _restart(self, role: str) -> bool:
        dead = [p for p in self.dead if p.role == role]
        if not dead or len(self.alive(role)) >= self.max_workers:
            return False
        p = dead[0]
        self.dead.remove(p)
        respawn(p, self.cluster.env, self.cluster.echo)  # same address and flags: routers find it where it was
        return True

    def _drain(self, role: str) -> bool:
        p = self._victim(role)
        if p is None:
            return False
        kill_group(p, signal.SIGTERM)  # goodbye, NOT_SERVING, in-flight work finishes, exit
        self.leaving.append(p)
        return True

    def settle(self, timeout_s: float) -> None:
        """Wait for draining workers to exit and starting ones to be ready; kill what does neither in time."""
        deadline = time.monotonic() + timeout_s
        for p in self.cluster.procs:
            if p.role not in ("prefill", "decode"):
                continue
            while p.popen.poll() is None and not (p.ready.is_set() and p not in self.leaving):
                if time.monotonic() > deadline:
                    kill_group(p, signal.SIGKILL)
                    p.popen.wait(5)
                    break
                time.sleep(0.1)
            if p.popen.poll() is not None:
                close_output(p)


def churn(cluster: LocalCluster, seconds: float, concurrency: int = 4, deadline_s: float = 30.0,
          max_tokens: int = 16, max_workers: int = 3, seed: int = 0) -> ChurnResult:
    res = ChurnResult(seconds)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    parent, child = ctx.Pipe()
    load = ctx.Process(target=load_main, args=(cluster.router_address, stop, child, concurrency, deadline_s,
                                               max_tokens), name="churn-load", daemon=True)
    churner = Churner(cluster, max_workers, seed)
    load.start()
    time.sleep(2.0)  # the clients connect before the first action
    t0 = time.monotonic()
    for k in range(int(seconds)):
        time.sleep(max(0.0, t0 + k + 1 - time.monotonic()))
        churner.tick(ACTIONS[k % len(ACTIONS)], res)
    stop.set()
    if not parent.poll(deadline_s + WATCHDOG_GRACE_S + 30):
        load.kill()
        raise RuntimeError("the load process did not report")
    res.num_requests, ends, res.no_end, res.hung_ids = parent.recv()
    res.ends.update(ends)
    load.join(10)
    churner.settle(60.0)
    res.workers_checked = sum(1 for p in cluster.procs if p.role in ("prefill", "decode") and p.popen.poll() is None)
    res.leaked_blocks, res.integrity_errors = leak_check(cluster)
    return res


def report(res: ChurnResult) -> str:
    ends = ", ".join(f"{s} {n}" for s, n in sorted(res.ends.items(), key=lambda kv: -kv[1])) or "none"
    actions = ", ".join(f"{a} {res.actions[a]}" + (f" (+{res.skipped[a]} skipped)" if res.skipped[a] else "")
                        for a in ACTIONS)
    rows = [("seconds of churn", f"{res.seconds:.0f}"), ("actions", actions), ("requests", str(res.num_requests)),
            ("ends per status", ends), ("hung (deadline exceeded + no end)", f"{res.hung} ({res.no_end} no end)"),
            ("unclean statuses", str(res.unclean)),
            *([("hung request ids", ", ".join(res.hung_ids))] if res.hung_ids else []),
            ("leaked blocks", f"{res.leaked_blocks} on {res.workers_checked} surviving workers"),
            ("integrity errors", "; ".join(res.integrity_errors) or "none")]
    return "\n".join(f"| {k} | {v} |" for k, v in [("measured", "value"), ("---", "---"), *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="how long to churn (one action a second)")
    ap.add_argument("--concurrency", type=int, default=4, help="clients in the closed loop")
    ap.add_argument("--deadline-s", type=float, default=30.0, help="each request's gRPC deadline")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-workers", type=int, default=3, help="live workers per role at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--echo", action="store_true", help="every process's log lines to stderr, prefixed by role")
    a = ap.parse_args()
    if a.seconds <= 0 or a.concurrency < 1 or a.max_workers < 2:
        ap.error("--seconds must be > 0, --concurrency >= 1, --max-workers >= 2")
    with LocalCluster(2, 2, policy="round_robin", router_args=["--local-prefill-tokens", "0"], echo=a.echo) as c:
        res = churn(c, a.seconds, a.concurrency, a.deadline_s, a.max_tokens, a.max_workers, a.seed)
    print(report(res))


if __name__ == "__main__":
    main()
