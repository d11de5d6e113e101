"""The async gRPC load driver over the public ``Generation.Generate`` stream.

Open loop: request i is sent at ``send_at[i]`` seconds whatever the server does. Closed loop: ``concurrency``
clients each send their next request when their previous one finishes. Both stop sending after
``duration_s``, and every request carries a deadline, so a run always ends.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

import grpc

from pdserve.bench.metrics import Record
from pdserve.bench.workloads import BenchRequest
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import bearer

logger = logging.getLogger(__name__)

STREAMS_PER_CHANNEL = 64  # stay under the server's HTTP/2 concurrent-stream limit (100 by default)
MAX_CHANNELS = 8
CONNECT_TIMEOUT_S = 15.0


class Progress:
    """A progress bar on stderr: tqdm when installed, else a one-line counter. Only for >= 20 requests."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.done = total, label, 0
        self.enabled = enabled and total >= 20
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False, unit="req")
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


CACHE_MODES = {"bypass": pb.CACHE_BYPASS, "use": pb.CACHE_USE, "refresh": pb.CACHE_REFRESH}


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What every request of a run asks for besides its workload: the model (a base model, adapter or route
    name; empty: the router's default) and the response-cache mode (default bypass: a load test measures the
    serving path, and a repeated seed would otherwise be answered from the router's cache)."""

    model: str = ""
    cache: str = "bypass"

    def __post_init__(self):
        if self.cache not in CACHE_MODES:
            raise ValueError(f"--cache: one of {', '.join(CACHE_MODES)}, got {self.cache!r}")


def to_proto(req: BenchRequest, request_id: str, tenant: str = "",
             options: RequestOptions = RequestOptions()) -> pb.GenerateRequest:
    """Greedy, ignore_eos and max_tokens = output_len, so every output is exactly output_len tokens."""
    sampling = pb.SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
    msg = pb.GenerateRequest(request_id=request_id, sampling=sampling, session_id=req.session, tenant=tenant,
                             model=options.model, cache=CACHE_MODES[options.cache])
    if req.prompt:
        msg.prompt = req.prompt
    else:
        msg.token_ids.extend(req.token_ids)
    return msg


async def generate_one(stub, req: BenchRequest, request_id: str, t0: float, timeout_s: float,
                       metadata: tuple | None = None, options: RequestOptions = RequestOptions()) -> Record:
    """Send one request and time every streamed message (seconds since ``t0``, perf_counter clock)."""
    rec = Record(send_time=time.perf_counter() - t0, prompt_len=req.prompt_len, request_id=request_id,
                 output_len=req.output_len)
    try:
        async for resp in stub.Generate(to_proto(req, request_id, options=options), timeout=timeout_s, metadata=metadata):
            rec.chunk_times.append(time.perf_counter() - t0)
            rec.chunk_tokens.append(len(resp.token_ids))
            if resp.finish_reason:
                rec.finish_reason = resp.finish_reason
                rec.cached_prompt_tokens = resp.usage.cached_prompt_tokens
                rec.prefill_worker, rec.decode_worker = resp.prefill_worker, resp.decode_worker
                rec.server_ttft_s = resp.timings.first_token_s
                if resp.usage.prompt_tokens:
                    rec.prompt_len = resp.usage.prompt_tokens
    except grpc.aio.AioRpcError as e:
        rec.status, rec.error = e.code().name, (e.details() or "")[:200]
        logger.debug("request %s failed: %s: %s", request_id, rec.status, rec.error)
    rec.end_time = time.perf_counter() - t0
    if rec.status == "OK" and not rec.chunk_times:
        rec.status = "EMPTY"
    return rec


class _Channels:
    """A few independent HTTP/2 connections, so many streams in flight do not queue in the client."""

    def __init__(self, address: str, max_in_flight: int, api_key: str = "", options: RequestOptions = RequestOptions()):
        n = min(MAX_CHANNELS, max(1, -(-max_in_flight // STREAMS_PER_CHANNEL)))
        opts = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(address, options=opts) for _ in range(n)]
        self.stubs = [pb_grpc.GenerationStub(ch) for ch in self.channels]
        self.address = address
        self.metadata = bearer(api_key)  # the router's API key
        self.options = options

    async def __aenter__(self) -> _Channels:
        try:
            await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in self.channels)), CONNECT_TIMEOUT_S)
        except TimeoutError:
            await self.__aexit__()
            raise ConnectionError(f"router {self.address}: not reachable within {CONNECT_TIMEOUT_S:g}s") from None
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels))

    def stub(self, i: int):
        return self.stubs[i % len(self.stubs)]


async def run_open_loop(address: str, reqs: list[BenchRequest], send_at: list[float], duration_s: float,
                        timeout_s: float = 120.0, progress: bool = True, id_prefix: str = "bench",
                        api_key: str = "", options: RequestOptions = RequestOptions()) -> list[Record]:
    """Send request i at ``send_at[i]`` seconds from the start; requests due after ``duration_s`` are not sent.
    Returns the records of the requests sent, in send order, once all have finished."""
    if len(reqs) != len(send_at):
        raise ValueError(f"send_at: {len(send_at)} times for {len(reqs)} requests")
    async with _Channels(address, len(reqs), api_key, options) as chans:
        bar = Progress(len(reqs), "requests", progress)
        tasks = []

        async def tracked(i: int, r: BenchRequest) -> Record:
            rec = await generate_one(chans.stub(i), r, f"{id_prefix}-{i}", t0, timeout_s, chans.metadata,
                                     chans.options)
            bar.tick()
            return rec

        t0 = time.perf_counter()
        for i, (r, at) in enumerate(zip(reqs, send_at, strict=True)):
            if at > duration_s:
                logger.info("duration %.1fs reached: sent %d of %d requests", duration_s, i, len(reqs))
                break
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(tracked(i, r)))
        try:
            records = list(await asyncio.gather(*tasks))
        finally:
            bar.close()
        return records


async def run_closed_loop(address: str, reqs: list[BenchRequest], concurrency: int, duration_s: float,
                          timeout_s: float = 120.0, progress: bool = True, id_prefix: str = "bench",
                          api_key: str = "", options: RequestOptions = RequestOptions()) -> list[Record]:
    """``concurrency`` clients each send the next unsent request when their previous one finishes; no new
    request starts after ``duration_s``. Returns the records in send order."""
    if concurrency < 1:
        raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
    async with _Channels(address, concurrency, api_key, options) as chans:
        bar = Progress(len(reqs), "requests", progress)
        it = iter(enumerate(reqs))
        records: list[tuple[int, Record]] = []

        async def client() -> None:
            for i, r in it:
                if time.perf_counter() - t0 > duration_s:
                    return
                records.append((i, await generate_one(chans.stub(i), r, f"{id_prefix}-{i}", t0, timeout_s,
                                                      chans.metadata, chans.options)))
                bar.tick()

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            bar.close()
        return [rec for _, rec in sorted(records, key=lambda x: x[0])]
