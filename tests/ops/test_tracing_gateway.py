"""The gateway's ``--otlp-endpoint``: its span joins the client's trace (W3C ``traceparent`` header) and the
router's ``generate`` span hangs under it (traceparent in the gRPC metadata). Gateway, router and workers run
in this process with one in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from pdserve.cli import build_parser
from pdserve.serving import tracing
from tests.prefill.helpers import run, running

sdk = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def _post(url: str) -> dict:
    body = json.dumps({"model": "tiny", "prompt": "hello world", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/completions", body, {"Content-Type": "application/json",
                                                             "traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


async def _through_the_gateway() -> dict:
    from pdserve.router.gateway.server import GatewayConfig
    from pdserve.router.gateway.server import serve as serve_gateway
    from pdserve.router.server import RouterConfig, serve

    async with running("prefill") as p, running("decode") as d:
        loop = asyncio.get_running_loop()
        ready, stop = loop.create_future(), asyncio.Event()
        router = asyncio.create_task(serve(RouterConfig(model="tiny", prefill=(p.address,), decode=(d.address,),
                                                        local_prefill_tokens=0), ready=ready, stop=stop))
        gw_ready, gw_stop = loop.create_future(), asyncio.Event()
        try:
            address = await asyncio.wait_for(ready, 60)
            gateway = asyncio.create_task(serve_gateway(GatewayConfig(router=address, port=0), gw_ready, gw_stop))
            try:
                url = await asyncio.wait_for(gw_ready, 60)
                return await asyncio.to_thread(_post, url)
            finally:
                gw_stop.set()
                await asyncio.wait_for(gateway, 30)
        finally:
            stop.set()
            await asyncio.wait_for(router, 30)


def test_the_gateway_takes_an_otlp_endpoint():
    parser = build_parser()
    a = parser.parse_args(["gateway", "--otlp-endpoint", "127.0.0.1:4317"])
    assert a.otlp_endpoint == "127.0.0.1:4317"
    assert parser.parse_args(["gateway"]).otlp_endpoint == ""


def test_the_gateway_span_joins_the_clients_trace_and_parents_the_router():
    exporter = sdk.InMemorySpanExporter()
    assert tracing.setup("pdserve-test", exporter=exporter)
    try:
        out = run(_through_the_gateway())
    finally:
        tracing.shutdown()
    assert out["usage"]["completion_tokens"] == 4
    spans = exporter.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACE_ID}, "one trace: the client's"
    (gw,) = [s for s in spans if s.name == "gateway"]
    assert f"{gw.parent.span_id:016x}" == CLIENT_SPAN and gw.attributes["http.route"] == "/v1/completions"
    (root,) = [s for s in spans if s.name == "generate"]
    assert root.parent.span_id == gw.context.span_id
    assert {"decode", "prefill", "kv_transfer", "kv_receive"} <= {s.name for s in spans}
