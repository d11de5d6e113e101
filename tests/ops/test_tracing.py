"""The span tree of a disaggregated request, router -> decode -> prefill, with the in-memory exporter.

Router and both workers run in this process and share one tracer provider, so the whole tree lands in one
exporter; between processes the same traceparent travels in gRPC metadata.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving import tracing
from tests.prefill.helpers import greedy, run, running

sdk = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")


def test_without_the_flag_nothing_imports_opentelemetry():
    code = ("import sys; from pdserve.serving import tracing; from pdserve.router import failover; "
            "from pdserve.prefill import service; from pdserve.decode import service as d; "
            "s = tracing.start('x'); s.end(); assert tracing.with_traceparent(None) is None; "
            "assert not any(m.startswith('opentelemetry') for m in sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


async def _generate_through_a_router(prefill: str, decode: str) -> list[int]:
    from pdserve.router.server import RouterConfig, serve

    loop = asyncio.get_running_loop()
    ready, stop = loop.create_future(), asyncio.Event()
    task = asyncio.create_task(serve(RouterConfig(model="tiny", prefill=(prefill,), decode=(decode,),
                                                  local_prefill_tokens=0), ready=ready, stop=stop))
    address = await asyncio.wait_for(ready, 60)
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            req = pb.GenerateRequest(token_ids=list(range(10, 60)), sampling=greedy(5))
            return [t async for r in pb_grpc.GenerationStub(ch).Generate(req, timeout=60) for t in r.token_ids]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_span_tree_of_a_disaggregated_request():
    exporter = sdk.InMemorySpanExporter()
    assert tracing.setup("pdserve-test", exporter=exporter)
    try:
        async def go():
            async with running("prefill") as p, running("decode") as d:
                return await _generate_through_a_router(p.address, d.address)

        assert len(run(go())) == 5
    finally:
        tracing.shutdown()
    spans = exporter.get_finished_spans()
    by_name = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert len({s.context.trace_id for s in spans}) == 1, "one trace, router to prefill"

    def one(name):
        assert len(by_name.get(name, [])) == 1, (name, sorted(by_name))
        return by_name[name][0]

    def parent_of(span):
        return next(s for s in spans if s.context.span_id == span.parent.span_id)

    root = one("generate")
    assert root.parent is None
    decision = one("route_decision")
    assert parent_of(decision) is root and decision.attributes["pdserve.prefill"]
    attempt = one("attempt")
    assert parent_of(attempt) is root
    assert parent_of(one("first_token")) is attempt
    decode = one("decode")
    assert parent_of(decode) is attempt  # traceparent in the Decode call's metadata
    assert any(e.name == "first_token" for e in decode.events)
    prefill = one("prefill")
    assert parent_of(prefill) is decode  # and in the Prefill call's
    for name in ("prefill_queue", "prefill_compute", "kv_transfer"):
        assert parent_of(one(name)) is prefill, name
    kv = one("kv_transfer")
    assert kv.attributes["kv.bytes"] > 0 and kv.attributes["kv.path"]
    assert kv.attributes["kv.peer"].startswith("decode-")
    received = one("kv_receive")  # the decode worker's end of the transfer, joined through the KV BEGIN frame
    assert parent_of(received) is prefill, "traceparent in BEGIN: the prefill span, not the decode call's"
    assert received.attributes["kv.bytes"] == kv.attributes["kv.bytes"]
    assert received.attributes["kv.path"] == kv.attributes["kv.path"] and received.attributes["kv.resends"] == 0
    for name in ("kv_transfer_wait", "decode_queue"):
        assert parent_of(one(name)) is decode, name
    assert root.start_time <= prefill.start_time <= prefill.end_time <= root.end_time
