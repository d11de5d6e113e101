"""The gateway's aiohttp application: OpenAI endpoints over the router's public gRPC API.

- ``POST /v1/completions``, ``POST /v1/chat/completions``: one router call per choice (``Complete``, or
  ``Generate`` when streaming), at most ``MAX_CALLS_IN_FLIGHT`` of a request at once. ``Authorization: Bearer KEY`` is forwarded as gRPC metadata, so the router's
  API keys apply unchanged.
- Streaming is Server-Sent Events: a ``data: {chunk}`` per router response, the usage chunk when
  ``stream_options.include_usage``, then ``data: [DONE]``. The first router response (or error) is awaited
  before the HTTP status is sent, so a refused request is a real 4xx/5xx, not an error inside a 200 stream.
- A client that disconnects cancels its handler (``handler_cancellation``) or fails its next write; either
  way every gRPC call of the request is cancelled, so the decode worker frees the KV blocks at once.
- ``GET /v1/models`` (the router's ``Models``), ``GET /health`` (the router's grpc health), ``GET /metrics``.
- Traces (``--otlp-endpoint``): a ``gateway`` span per completion request, under the client's W3C
  ``traceparent`` header when it sends one; its traceparent goes to the router in gRPC metadata, so the
  router's ``generate`` span (and everything below it) joins the same trace.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

import pdserve.serving.tracing as tracing
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.gateway import metrics
from pdserve.router.gateway.errors import GatewayError, from_rpc_error
from pdserve.router.gateway.openai_request import Plan, load_body, parse
from pdserve.router.gateway.openai_response import StreamChunks, full_response

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_FORWARDED = ("authorization", "x-api-key")
# router calls one HTTP request runs at once (n x prompts choices): more at once would only meet the router's
# per-worker admission bound (429 for a lone request on an idle cluster); the rest start as these end
MAX_CALLS_IN_FLIGHT = 32


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _event(obj) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def _error_response(e: GatewayError) -> web.Response:
    return web.Response(status=e.status, text=e.json(), content_type="application/json", headers=e.headers())


def auth_metadata(request: web.Request) -> tuple[tuple[str, str], ...] | None:
    """The client's credentials as the router reads them (gRPC metadata)."""
    md = []
    for name in _FORWARDED:
        value = request.headers.get(name)
        if value:
            if not (value.isascii() and value.isprintable()):
                raise GatewayError(401, f"{name}: malformed header", code="invalid_api_key")
            md.append((name, value))
    return tuple(md) or None


class Merge:
    """Responses of several streaming calls as ``(choice index, response)``, in arrival order; raises the
    first call's AioRpcError. At most ``MAX_CALLS_IN_FLIGHT`` calls run at once (the next starts as one ends).
    ``close`` cancels every call (and the tasks reading them)."""

    def __init__(self, starts: list):
        self.calls: list = []
        self.tasks: list[asyncio.Task] = []
        self.live = len(starts)
        if len(starts) > 1:
            self.queue: asyncio.Queue = asyncio.Queue()
            slots = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
            self.tasks = [asyncio.ensure_future(self._pump(i, start, slots)) for i, start in enumerate(starts)]
        else:
            self.calls = [starts[0]()]
            self.reader = self.calls[0].__aiter__()

    async def _pump(self, index: int, start, slots: asyncio.Semaphore) -> None:
        async with slots:
            call = start()
            self.calls.append(call)
            try:
                async for resp in call:
                    self.queue.put_nowait((index, resp, None))
            except grpc.aio.AioRpcError as e:
                self.queue.put_nowait((index, None, e))
                return
        self.queue.put_nowait((index, None, None))

    async def next(self) -> tuple[int, pb.GenerateResponse] | None:
        """The next response, or None once every call has ended."""
        if not self.tasks:
            try:
                return 0, await self.reader.__anext__()
            except StopAsyncIteration:
                return None
        while self.live:
            index, resp, err = await self.queue.get()
            if err is not None:
                raise err
            if resp is None:
                self.live -= 1
                continue
            return index, resp
        return None

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for c in self.calls:
            c.cancel()


async def _all(starts: list) -> list:
    """Run every call (at most ``MAX_CALLS_IN_FLIGHT`` at once) and return their results in order; on the first
    failure cancel the rest (and on our own cancellation, all)."""
    if len(starts) == 1:
        return [await starts[0]()]
    slots = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)

    async def one(start):
        async with slots:
            return await start()

    tasks = [asyncio.ensure_future(one(start)) for start in starts]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


class Gateway:
    def __init__(self, router: str, channel: grpc.aio.Channel, timeout_s: float = 600.0,
                 default_chat_max_tokens: int | None = None, max_body_bytes: int = 16 << 20):
        self.router = router
        self.stub = pb_grpc.GenerationStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)
        self.timeout_s = timeout_s
        self.default_chat_max_tokens = default_chat_max_tokens
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.default_model = ""  # the router's default model (its first), learnt on the first stream without one

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)  # ids may hold a "/" (hub ids, BASE/ADAPTER)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        """OpenAI error JSON for every failure; requests, latency and disconnects counted."""
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "other"
        t0 = time.perf_counter()
        metrics.IN_FLIGHT.inc()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except GatewayError as e:
            status = e.status
            return _error_response(e)
        except web.HTTPException as e:
            status = e.status
            return _error_response(GatewayError(e.status, e.text or e.reason, code=e.reason.lower().replace(" ", "_")))
        except asyncio.CancelledError:
            status = 499  # the client went away; the calls were cancelled with this task
            metrics.DISCONNECTS.inc()
            raise
        except Exception as e:
            logger.exception("%s %s failed", request.method, request.path)
            return _error_response(GatewayError(500, f"internal error: {type(e).__name__}", code="internal"))
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - t0)

    async def _plan(self, request: web.Request, kind: str) -> Plan:
        return parse(load_body(await request.read()), kind, self.default_chat_max_tokens)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, await self._plan(request, "completion"))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, await self._plan(request, "chat"))

    async def _generate(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        md = auth_metadata(request)
        span = tracing.start("gateway", request.headers.get(tracing.TRACEPARENT, "") if tracing.enabled() else None,
                             {"http.route": request.path, "pdserve.stream": plan.stream,
                              "pdserve.choices": len(plan.requests)})
        try:
            md = tracing.with_traceparent(md, span)
            if plan.stream:
                return await self._stream(request, plan, md)
            try:
                results = await _all([functools.partial(self.stub.Complete, r, metadata=md, timeout=self.timeout_s)
                                      for r in plan.requests])
            except grpc.aio.AioRpcError as e:
                span.set_attribute("error", e.code().name)
                raise from_rpc_error(e) from None
            return web.Response(text=_dumps(full_response(plan, results, int(time.time()))),
                                content_type="application/json")
        finally:
            span.end()

    async def _stream(self, request: web.Request, plan: Plan, md) -> web.StreamResponse:
        t0 = time.perf_counter()
        chunks = StreamChunks(plan, int(time.time()), plan.model or await self._default_model(md))
        merge = Merge([functools.partial(self.stub.Generate, r, metadata=md, timeout=self.timeout_s)
                       for r in plan.requests])
        resp = web.StreamResponse(headers=SSE_HEADERS)
        try:
            try:
                first = await merge.next()  # a refusal is still a plain HTTP error here
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e) from None
            await resp.prepare(request)
            metrics.FIRST_CHUNK.labels(request.path).observe(time.perf_counter() - t0)
            item = first
            try:
                while item is not None:
                    await resp.write(_event(chunks.chunk(*item)))
                    item = await merge.next()
                if plan.include_usage:
                    await resp.write(_event(chunks.usage_chunk()))
            except grpc.aio.AioRpcError as e:  # headers are sent: the error goes in the stream
                await resp.write(_event(from_rpc_error(e).body()))
            await resp.write(DONE)
            await resp.write_eof()
        except ConnectionError:  # the client went away mid-stream (a failed write)
            metrics.DISCONNECTS.inc()
            logger.info("[%s] client disconnected; cancelled its %d call(s)", plan.id, len(plan.requests))
        finally:
            merge.close()
        return resp

    async def _default_model(self, md) -> str:
        """The name an empty ``model`` means, for the stream's chunks (only the router's last message names
        the model; every chunk's ``model`` was "" until then). "" if the router cannot say."""
        if not self.default_model:
            try:
                resp = await self.stub.Models(pb.ModelsRequest(), metadata=md, timeout=10)
            except grpc.aio.AioRpcError:
                return ""
            self.default_model = resp.models[0].id if resp.models else ""
        return self.default_model

    async def _models(self, request: web.Request) -> list[dict]:
        try:
            resp = await self.stub.Models(pb.ModelsRequest(), metadata=auth_metadata(request), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return [{"id": m.id, "object": "model", "created": self.created, "owned_by": "pdserve",
                 "max_model_len": m.max_model_len} for m in resp.models]

    async def models(self, request: web.Request) -> web.Response:
        data = await self._models(request)
        return web.Response(text=_dumps({"object": "list", "data": data}), content_type="application/json")

    async def model(self, request: web.Request) -> web.Response:
        """OpenAI's retrieve-model (``client.models.retrieve(id)``): the model as ``/v1/models`` lists it, or 404."""
        name = request.match_info["model"]
        for m in await self._models(request):
            if m["id"] == name:
                return web.Response(text=_dumps(m), content_type="application/json")
        raise GatewayError(404, f"model: {name!r} is not served here", param="model", code="model_not_found")

    async def health(self, request: web.Request) -> web.Response:
        """200 while the router answers its health check as SERVING, else 503."""
        check = health_pb2.HealthCheckRequest(service="pdserve.v1.Generation")
        try:
            r = await self.health_stub.Check(check, timeout=2.0)
        except grpc.aio.AioRpcError as e:
            raise GatewayError(503, f"router {self.router}: {e.code().name}", code="router_unavailable") from None
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            raise GatewayError(503, f"router {self.router} is not serving", code="router_not_serving")
        return web.Response(text=_dumps({"status": "ok", "router": self.router}), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
