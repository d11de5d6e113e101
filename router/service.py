"""The public Generation servicer: parse at the edge, run the failover loop, map errors to status.

``Generate`` streams and ``Complete`` folds the same stream into one answer; both go through ``_serve``, the
one place that maps a failure to its gRPC status (serving.errors) and counts the request's outcome.
"""

from __future__ import annotations

import asyncio

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router import metrics
from pdserve.router.admission import Admission
from pdserve.router.chat import ChatTemplate
from pdserve.router.failover import Failover
from pdserve.router.membership import Membership
from pdserve.router.policy import PairPolicy
from pdserve.router.request import RequestParser
from pdserve.router.response_cache import ResponseCache, cache_mode
from pdserve.router.responses import Aggregate, RouterCounters
from pdserve.router.token_text import TokenTexts
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
    ):
        self.parser = RequestParser(tokenizer, chat=chat, model=model, context_limit=membership.max_model_len)
        self.membership = membership
        self.token_texts = TokenTexts(tokenizer)
        self.failover = Failover(membership, policy, admission, rpc_timeout_s, max_retries, backoff_s)
        self.response_cache = response_cache  # None: off (router.response_cache)

    @property
    def admission(self) -> Admission:
        return self.failover.admission

    @property
    def counters(self) -> RouterCounters:
        return self.failover.counters

    async def _serve(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Parse, run, and end with a status: OK, the failure's mapped status, or CANCELLED."""
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
        parsed = await self.parser.parse_async(request)  # heavy parsing runs off the event loop
        mode = cache_mode(request.cache)
        responses = self._run(parsed, time_remaining)
        if self.response_cache is not None:
            responses = self.response_cache.through(parsed, mode, responses)
        async for resp in responses:
            yield resp

    async def _run(self, parsed, time_remaining):
        with_logprobs = parsed.sampling.logprobs is not None
        async for resp in self.failover.run(parsed, time_remaining):
            if with_logprobs:
                self.token_texts.fill(resp)
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
        """The one model this router serves, its context length once a worker has reported it."""
        max_len = max((w.load.max_model_len for w in self.membership.workers.values()), default=0)
        parser = self.parser
        return pb.ModelsResponse(models=[pb.ModelInfo(id=parser.model, max_model_len=max_len, chat=parser.chat is not None)])
