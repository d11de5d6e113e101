"""The public Generation servicer: parse at the edge, run the failover loop, map errors to status.

``Generate`` streams and ``Complete`` folds the same stream into one answer; both go through ``_serve``, the
one place that maps a failure to its gRPC status (serving.errors) and counts the request's outcome.

``GenerateRequest.model`` is resolved first (router.models: a base model, an adapter, or a route's choice), then
the request is parsed with that base model's tokenizer and routed within its pools.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc

from pdserve.engine.errors import InvalidRequestError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router import metrics
from pdserve.router.admission import Admission
from pdserve.router.chat import ChatTemplate
from pdserve.router.failover import Failover
from pdserve.router.membership import Membership
from pdserve.router.models import BaseModel, ModelCatalog
from pdserve.router.policy import PairPolicy
from pdserve.router.request import MAX_NAME_LEN, RequestParser
from pdserve.router.response_cache import ResponseCache, cache_mode
from pdserve.router.responses import Aggregate, RouterCounters
from pdserve.router.token_text import TokenTexts
from pdserve.serving import tracing
from pdserve.serving.errors import abort_with, status_for


class GenerationServicer:
    def __init__(
        self,
        membership: Membership,
        policy: PairPolicy,
        tokenizer,
        admission: Admission | None = None,
        rpc_timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.05,
        chat: ChatTemplate | None = None,
        model: str = "",
        response_cache: ResponseCache | None = None,
        catalog: ModelCatalog | None = None,
    ):
        self.membership = membership
        if catalog is None:  # one model: ``tokenizer``, ``chat`` and ``model`` describe it
            parser = RequestParser(tokenizer, chat=chat, model=model, context_limit=membership.max_model_len,
                                   match_model=False)
            catalog = ModelCatalog(membership, [BaseModel(model, model, parser, TokenTexts(tokenizer))])
        self.catalog = catalog
        self.failover = Failover(membership, policy, admission, rpc_timeout_s, max_retries, backoff_s)
        self.response_cache = response_cache  # every model's, keyed by the model that serves (None: off)

    @property
    def parser(self) -> RequestParser:
        """The default model's parser."""
        return self.catalog.bases[self.catalog.default].parser

    @property
    def admission(self) -> Admission:
        return self.failover.admission

    @property
    def counters(self) -> RouterCounters:
        return self.failover.counters

    async def _serve(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Parse, run, and end with a status: OK, the failure's mapped status, or CANCELLED."""
        if context is not None:  # a caller's traceparent (the gateway's): the request's span joins its trace
            tracing.CURRENT.set(tracing.from_context(context))
        try:
            async for resp in self.respond(request, context.time_remaining if context is not None else None):
                yield resp
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            metrics.CANCELLED.inc()
            metrics.count_request("CANCELLED")
            raise
        except Exception as e:  # every failure ends the RPC with the status the one table gives it
            metrics.count_request(status_for(e).name)
            await abort_with(context, e)
        metrics.count_request("OK")

    async def respond(self, request: pb.GenerateRequest, time_remaining=None):
        """The answer's messages (through the response cache when there is one); raises a domain error. Batch
        jobs (router.batch) run their requests here too."""
        if len(request.model) > MAX_NAME_LEN:  # before it is looked up (the rest is checked by the parser)
            raise InvalidRequestError(f"model: at most {MAX_NAME_LEN} characters")
        target = self.catalog.resolve(request.model, request.session_id)
        self.catalog.begin(target)  # from resolution on: an unload of its adapter waits for it to end
        try:
            base = self.catalog.bases[target.base]
            parsed = await base.parser.parse_async(request)  # heavy parsing runs off the event loop
            parsed = dataclasses.replace(parsed, model=target.name, base_model=target.base, lora_name=target.lora)
            mode = cache_mode(request.cache)
            responses = self._run(parsed, base.token_texts, time_remaining)
            cache = self.response_cache
            if cache is not None:
                responses = cache.through(parsed, mode, responses)
            async for resp in responses:
                yield resp
        finally:
            self.catalog.end(target)

    def forget_answers(self, model: str) -> None:
        """Drop the response cache's answers from ``model`` (an adapter loaded anew or unloaded)."""
        if self.response_cache is not None:
            self.response_cache.drop_model(model)

    async def _run(self, parsed, token_texts: TokenTexts, time_remaining):
        with_logprobs = parsed.sampling.logprobs is not None or parsed.sampling.prompt_logprobs is not None
        async for resp in self.failover.run(parsed, time_remaining):
            if with_logprobs:
                token_texts.fill(resp)
            yield resp

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async for resp in self._serve(request, context):
            yield resp

    async def Complete(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        total = Aggregate()
        async for resp in self._serve(request, context):
            total.add(resp)
        return total.result()

    async def Models(self, request: pb.ModelsRequest, context: grpc.aio.ServicerContext) -> pb.ModelsResponse:
        """Every servable name (base models, adapters, routes), with its base model's context length once a
        worker has reported it and whether that model has a chat template."""
        out = pb.ModelsResponse()
        for entry in self.catalog.entries():
            if entry.state in ("unloading", "missing target"):
                continue
            base = self.catalog.bases.get(entry.base)
            out.models.append(pb.ModelInfo(
                id=entry.name, max_model_len=max((w.load.max_model_len for w in self.catalog.pool_workers(entry.base)),
                                                 default=0),
                chat=base is not None and base.parser.chat is not None))
        return out
