"""The async gRPC load driver: open loop (send times given) or closed loop (fixed concurrency)."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc

from bench.metrics import Record
from bench.workloads import BenchRequest
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc


class Progress:
    """A one-line progress bar on stderr (tqdm when installed)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.done = total, label, 0
        self.enabled = enabled and total >= 20
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def tick(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        elif self.done % max(1, self.total // 20) == 0 or self.done == self.total:
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


async def one(stub, req: BenchRequest, t0: float, timeout_s: float, tenant: str = "") -> Record:
    rec = Record(send_time=time.perf_counter() - t0, prompt_len=len(req.token_ids))
    msg = pb.GenerateRequest(
        token_ids=req.token_ids, session_id=req.session, tenant=tenant,
        sampling=pb.SamplingParams(max_tokens=req.output_len, temperature=0, ignore_eos=True),
    )
    try:
        async for resp in stub.Generate(msg, timeout=timeout_s):
            rec.chunk_times.append(time.perf_counter() - t0)
            rec.chunk_tokens.append(len(resp.token_ids))
            if resp.finish_reason:
                rec.cached_prompt_tokens = resp.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as e:
        rec.status = e.code().name
    rec.end_time = time.perf_counter() - t0
    if rec.ok and not rec.chunk_times:
        rec.status = "EMPTY"
    return rec


async def run_open_loop(address: str, reqs: list[BenchRequest], send_at: list[float], duration_s: float,
                        timeout_s: float = 120.0, progress: bool = True) -> list[Record]:
    """Send request i at send_at[i] seconds (stops sending after duration_s); wait for all to finish."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        bar = Progress(len(reqs), "requests", progress)
        t0 = time.perf_counter()
        tasks = []

        async def tracked(r):
            rec = await one(stub, r, t0, timeout_s)
            bar.tick()
            return rec

        for r, at in zip(reqs, send_at, strict=True):
            if at > duration_s:
                break
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(tracked(r)))
        records = list(await asyncio.gather(*tasks))
        bar.close()
        return records


async def run_closed_loop(address: str, reqs: list[BenchRequest], concurrency: int, duration_s: float,
                          timeout_s: float = 120.0, progress: bool = True) -> list[Record]:
    """``concurrency`` clients each send their next request when the previous one finishes."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        bar = Progress(len(reqs), "requests", progress)
        t0 = time.perf_counter()
        it = iter(reqs)
        records: list[Record] = []

        async def client():
            for r in it:
                if time.perf_counter() - t0 > duration_s:
                    return
                records.append(await one(stub, r, t0, timeout_s))
                bar.tick()

        await asyncio.gather(*(client() for _ in range(concurrency)))
        bar.close()
        return records
