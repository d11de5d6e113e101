"""A worker that drains (SIGTERM: goodbye to the routers, then finish in-flight work) must not hang the streams
it is serving. The router used to close a removed worker's channel at once, which cancels its calls; grpc
raises CancelledError for that, the router's handler ended with no status, and the client waited out its
deadline (bench/churn.py found it). Router and workers run in this process."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from tests.prefill.helpers import greedy, run, running

MAX_TOKENS = 30
DEADLINE_S = 25.0


async def _wait_registered(admin, n: int) -> None:
    for _ in range(200):
        workers = (await admin.ListWorkers(pb.ListWorkersRequest(), timeout=5)).workers
        if sum(w.role == "decode" and w.healthy for w in workers) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the decode worker did not register")


async def _drain_mid_stream() -> tuple[list[int], str]:
    from pdserve.router.server import RouterConfig, serve

    async with running("prefill") as p:
        loop = asyncio.get_running_loop()
        ready, stop = loop.create_future(), asyncio.Event()
        router = asyncio.create_task(serve(RouterConfig(model="tiny", prefill=(p.address,),
                                                        local_prefill_tokens=0), ready=ready, stop=stop))
        try:
            address = await asyncio.wait_for(ready, 60)
            async with running("decode", routers=(address,), step_delay_s=0.05, grace_s=15.0) as d, \
                    grpc.aio.insecure_channel(address) as ch:
                await _wait_registered(pb_grpc.AdminStub(ch), 1)
                req = pb.GenerateRequest(token_ids=list(range(10, 60)), sampling=greedy(MAX_TOKENS))
                tokens, draining, status = [], None, "OK"
                try:
                    async for r in pb_grpc.GenerationStub(ch).Generate(req, timeout=DEADLINE_S):
                        tokens.extend(r.token_ids)
                        if draining is None and len(tokens) >= 3:
                            draining = asyncio.create_task(d.stopped())  # goodbye, then drain
                except grpc.aio.AioRpcError as e:
                    status = e.code().name
                await asyncio.wait_for(draining, 30)
                return tokens, status
        finally:
            stop.set()
            await asyncio.wait_for(router, 30)


@pytest.mark.timeout(180)
def test_a_draining_worker_finishes_its_streams_after_its_goodbye():
    tokens, status = run(_drain_mid_stream())
    assert status == "OK" and len(tokens) == MAX_TOKENS, (status, len(tokens))


@pytest.mark.timeout(180)
def test_a_call_cancelled_by_its_closing_channel_ends_with_a_status(monkeypatch):
    """Without the grace (a hard close), the cut call is a failed leg: with no other decode worker the client
    gets UNAVAILABLE, not silence until its deadline (DEADLINE_EXCEEDED)."""
    from pdserve.router import membership

    monkeypatch.setattr(membership, "REMOVED_CLOSE_GRACE_S", None)
    tokens, status = run(_drain_mid_stream())
    assert status == "UNAVAILABLE" and 3 <= len(tokens) < MAX_TOKENS, (status, len(tokens))
