"""Real prefill and decode workers in this process (127.0.0.1, port 0), driven through their gRPC API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.decode import server as decode_server
from pdserve.engine.config import EngineConfig
from pdserve.kvtransfer.base import TransferConfig
from pdserve.prefill import server as prefill_server
from pdserve.protos import pdserve_pb2 as pb

ENGINE = EngineConfig("tiny", num_blocks=64, block_size=16)
TRANSFER = TransferConfig(backend="tcp", secret="test-secret", timeout_s=10.0)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
SERVERS = {"prefill": prefill_server.serve, "decode": decode_server.serve}


class Worker:
    def __init__(self, address: str, stop: asyncio.Event, task: asyncio.Task):
        self.address = address
        self.stop = stop
        self.task = task
        self.channel = grpc.aio.insecure_channel(address)

    async def health(self) -> int:
        resp = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return resp.status

    async def stopped(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the worker to stop (as SIGTERM does) and wait until it has."""
        self.stop.set()
        await asyncio.wait_for(asyncio.shield(self.task), timeout)


@contextlib.asynccontextmanager
async def running(role: str, engine: EngineConfig = ENGINE, **options) -> AsyncIterator[Worker]:
    """Start a worker of ``role``; on exit stop it and check it stopped cleanly within its grace."""
    loop = asyncio.get_running_loop()
    ready, stop = loop.create_future(), asyncio.Event()
    options.setdefault("grace_s", 10.0)
    task = asyncio.create_task(SERVERS[role](engine, TRANSFER, "127.0.0.1:0", ready=ready, stop=stop, **options))
    done, _ = await asyncio.wait({ready, task}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what the worker raised at start
    if ready not in done:
        task.cancel()
        raise TimeoutError(f"{role} worker did not become ready in {START_TIMEOUT_S}s")
    worker = Worker(ready.result(), stop, task)
    try:
        yield worker
    finally:
        await worker.channel.close()
        if not task.done():
            await worker.stopped()
        task.result()


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run(coro, timeout: float = 180.0):
    """Run one scenario on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
