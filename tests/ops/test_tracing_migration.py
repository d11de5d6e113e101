"""The span tree of a migrated request: its decode worker dies mid-stream and the router migrates it.

Router, one prefill and two decode workers run in this process with one in-memory exporter. The decode
worker serving the stream is stopped with no grace (its stream is cut, as when the process dies); the router
re-prefills prompt + sent tokens on the other decode worker.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving import tracing
from tests.prefill.helpers import greedy, run, running

sdk = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")

MAX_TOKENS = 24
KILL_AFTER = 4


async def _serving(decodes) -> object:
    """The decode worker with a running sequence (polled: the stream's first tokens are out by now)."""
    for _ in range(100):
        for w in decodes:
            load = await pb_grpc.DecodeStub(w.channel).GetLoad(pb.LoadRequest(), timeout=5)
            if load.num_running:
                return w
        await asyncio.sleep(0.02)
    raise AssertionError("no decode worker is running the request")


async def _migrated_generate() -> tuple[list[int], str, pb.GenerateResponse]:
    from pdserve.router.server import RouterConfig, serve

    slow = {"step_delay_s": 0.05, "grace_s": 0.0}  # no grace: a stop cuts the stream like a crash
    async with running("prefill") as p, running("decode", **slow) as d1, running("decode", **slow) as d2:
        loop = asyncio.get_running_loop()
        ready, stop = loop.create_future(), asyncio.Event()
        task = asyncio.create_task(serve(RouterConfig(model="tiny", prefill=(p.address,),
                                                      decode=(d1.address, d2.address), local_prefill_tokens=0),
                                         ready=ready, stop=stop))
        address = await asyncio.wait_for(ready, 60)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                req = pb.GenerateRequest(token_ids=list(range(10, 60)), sampling=greedy(MAX_TOKENS))
                tokens, victim, last, stopping = [], "", None, None
                async for r in pb_grpc.GenerationStub(ch).Generate(req, timeout=90):
                    tokens.extend(r.token_ids)
                    last = r
                    if stopping is None and len(tokens) >= KILL_AFTER:
                        w = await _serving((d1, d2))
                        victim, stopping = w.address, asyncio.create_task(w.stopped())
                await asyncio.wait_for(stopping, 30)
                return tokens, victim, last
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


def test_span_tree_of_a_migrated_request():
    exporter = sdk.InMemorySpanExporter()
    assert tracing.setup("pdserve-test", exporter=exporter)
    try:
        tokens, victim, last = run(_migrated_generate())
    finally:
        tracing.shutdown()
    assert len(tokens) == MAX_TOKENS and last.decode_worker != victim
    spans = exporter.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert len({s.context.trace_id for s in spans}) == 1, "one trace through the migration"

    def parent_of(span):
        return next(s for s in spans if s.context.span_id == span.parent.span_id)

    (root,) = by_name["generate"]
    attempts = sorted(by_name["attempt"], key=lambda s: s.attributes["pdserve.attempt"])
    assert [a.attributes["pdserve.attempt"] for a in attempts] == [1, 2], sorted(by_name)
    assert all(parent_of(a) is root for a in attempts)
    assert "error" in attempts[0].attributes and "error" not in attempts[1].attributes
    (migration,) = by_name["migration"]  # the backoff between the two attempts, under the request
    assert parent_of(migration) is root and "retry" not in by_name
    assert migration.attributes["pdserve.failed_worker"] == victim
    assert KILL_AFTER <= migration.attributes["pdserve.num_sent_tokens"] < MAX_TOKENS
    assert attempts[0].end_time <= migration.start_time <= migration.end_time <= attempts[1].start_time
    assert len(by_name["route_decision"]) == 2 and all(parent_of(s) is root for s in by_name["route_decision"])
    decodes = by_name["decode"]
    assert sorted(parent_of(d).attributes["pdserve.attempt"] for d in decodes) == [1, 2]
    # the migration re-prefills prompt + sent tokens: a prefill (and its KV transfer) under each decode leg
    prefills = by_name["prefill"]
    assert sorted(parent_of(parent_of(p)).attributes["pdserve.attempt"] for p in prefills) == [1, 2]
    assert len(by_name["kv_transfer"]) == 2 and len(by_name["kv_receive"]) == 2
    assert root.start_time <= attempts[0].start_time and attempts[1].end_time <= root.end_time
