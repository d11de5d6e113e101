"""The public Generation servicer: validate, tokenize, pick a pair, orchestrate reserve -> prefill -> decode."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from protos import pdserve_pb2 as pb
from protos.convert import sampling_from_proto
from protos.rpc import status_for
from router.membership import Membership, Worker
from router.policy import PairPolicy

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_REQUEST_ID_LEN = 256


class RouteError(Exception):
    """A leg of the request failed; carries the status to return."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Leg:
    """Per-request accounting reported in the last response."""

    t_start: float = field(default_factory=time.monotonic)
    t_prefill_start: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    t_first_token: float = 0.0
    num_cached_tokens: int = 0
    prefill_worker: str = ""
    decode_worker: str = ""


class GenerationServicer:
    def __init__(self, membership: Membership, policy: PairPolicy, tokenizer, rpc_timeout_s: float = 60.0):
        self.membership = membership
        self.policy = policy
        self.tokenizer = tokenizer
        self.rpc_timeout_s = rpc_timeout_s
        self.num_requests = 0

    # ---- validation -------------------------------------------------------------------------------
    def parse(self, request: pb.GenerateRequest):
        """-> (request id, prompt token ids, SamplingParams); raises ValueError naming the bad field."""
        if len(request.request_id) > MAX_REQUEST_ID_LEN:
            raise ValueError(f"request_id: at most {MAX_REQUEST_ID_LEN} characters")
        has_prompt, has_ids = bool(request.prompt), bool(request.token_ids)
        if has_prompt == has_ids:
            raise ValueError("prompt: set exactly one of prompt or token_ids" + (" (both set)" if has_prompt else ""))
        if has_prompt:
            if len(request.prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
            token_ids = list(self.tokenizer.encode(request.prompt, add_special_tokens=True))
            if not token_ids:
                raise ValueError("prompt: tokenizes to no tokens")
        else:
            token_ids = list(request.token_ids)
        params = sampling_from_proto(request.sampling)
        decodes = self.membership.pool("decode", available_only=False)
        limits = [w.load for w in decodes if w.load.vocab_size]
        if limits:
            vocab, max_len = limits[0].vocab_size, limits[0].max_model_len
            bad = next((t for t in token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
            if len(token_ids) >= max_len:
                raise ValueError(f"prompt: {len(token_ids)} tokens exceeds the context limit of {max_len - 1}")
        rid = request.request_id or f"req-{uuid.uuid4().hex[:12]}"
        return rid, token_ids, params

    # ---- orchestration ----------------------------------------------------------------------------
    async def _run(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Yield GenerateResponse messages; raise RouteError on failure."""
        try:
            rid, token_ids, params = self.parse(request)
        except ValueError as e:
            raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        self.num_requests += 1
        leg = Leg()
        try:
            prefill, decode = self.policy.choose(self.membership.pool("prefill"), self.membership.pool("decode"))
        except LookupError as e:
            raise RouteError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        decode_req = pb.DecodeRequest(
            request_id=rid, token_ids=token_ids, sampling=request.sampling, priority=request.priority
        )
        decode.in_flight += 1
        reserved = False
        finished = False
        try:
            leg.decode_worker = decode.address
            if prefill is not None:
                reserved = await self._prefill(rid, token_ids, request, prefill, decode, decode_req, leg)
            leg.t_prefill_start = leg.t_prefill_start or time.monotonic()
            call = decode.stub.Decode(decode_req, timeout=self._remaining(context))
            num_out = 0
            try:
                async for chunk in call:
                    reserved = False
                    if not leg.t_first_token and chunk.token_ids:
                        leg.t_first_token = time.monotonic()
                    num_out += len(chunk.token_ids)
                    leg.num_cached_tokens = max(leg.num_cached_tokens, chunk.num_cached_tokens)
                    resp = pb.GenerateResponse(
                        request_id=rid, token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs
                    )
                    if chunk.finish_reason:
                        finished = True
                        self._finalize(resp, chunk.finish_reason, len(token_ids), num_out, leg)
                    yield resp
            finally:
                if not finished:
                    call.cancel()
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE,) and not finished:
                self.membership.mark_failed(decode)
            raise RouteError(code, f"decode worker {decode.address}: {e.details()}") from None
        finally:
            decode.in_flight -= 1
            if reserved or not finished:
                # free the decode reservation / request at once: fire and forget, never block the client
                asyncio.ensure_future(self._release(decode, rid))

    async def _prefill(self, rid, token_ids, request, prefill: Worker, decode: Worker, decode_req, leg: Leg) -> bool:
        fp = prefill.load.fingerprint
        try:
            res = await decode.stub.Reserve(
                pb.ReserveRequest(
                    request_id=rid, token_ids=token_ids, sampling=request.sampling, fingerprint=fp, ttl_s=30.0
                ),
                timeout=10.0,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.membership.mark_failed(decode)
            raise RouteError(e.code(), f"decode worker {decode.address}: {e.details()}") from None
        leg.t_prefill_start = time.monotonic()
        prefill.in_flight += 1
        try:
            out = await prefill.stub.Prefill(
                pb.PrefillRequest(
                    request_id=rid,
                    token_ids=token_ids,
                    sampling=request.sampling,
                    priority=request.priority,
                    target=pb.KVTarget(endpoint=res.kv_endpoint, block_ids=res.block_ids, transfer_id=res.transfer_id),
                ),
                timeout=self.rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.membership.mark_failed(prefill)
            raise RouteError(e.code(), f"prefill worker {prefill.address}: {e.details()}") from None
        finally:
            prefill.in_flight -= 1
        leg.prefill_worker = prefill.address
        leg.prefill_s = out.prefill_s
        leg.transfer_s = out.transfer_s
        leg.num_cached_tokens = out.num_cached_tokens
        decode_req.prefilled = True
        decode_req.first_token_id = out.first_token_id
        decode_req.num_cached_tokens = out.num_cached_tokens
        if out.HasField("first_logprob"):
            decode_req.first_logprob.CopyFrom(out.first_logprob)
        return True

    async def _release(self, decode: Worker, rid: str) -> None:
        try:
            await decode.stub.Release(pb.ReleaseRequest(request_id=rid), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            logger.warning("[%s] release on %s failed: %s", rid, decode.address, e.code().name)

    def _remaining(self, context: grpc.aio.ServicerContext) -> float:
        left = context.time_remaining() if context is not None else None
        return min(left, self.rpc_timeout_s * 10) if left is not None else self.rpc_timeout_s * 10

    @staticmethod
    def _finalize(resp: pb.GenerateResponse, reason: str, num_prompt: int, num_out: int, leg: Leg) -> None:
        now = time.monotonic()
        resp.finish_reason = reason
        resp.usage.CopyFrom(
            pb.Usage(prompt_tokens=num_prompt, completion_tokens=num_out, cached_prompt_tokens=leg.num_cached_tokens)
        )
        resp.prefill_worker = leg.prefill_worker
        resp.decode_worker = leg.decode_worker
        resp.timings.CopyFrom(
            pb.Timings(
                queue_s=max(0.0, leg.t_prefill_start - leg.t_start),
                prefill_s=leg.prefill_s,
                transfer_s=leg.transfer_s,
                first_token_s=(leg.t_first_token or now) - leg.t_start,
                total_s=now - leg.t_start,
            )
        )

    # ---- RPCs -------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for resp in self._run(request, context):
                yield resp
        except RouteError as e:
            await context.abort(e.code, str(e))
        except (ValueError, KeyError) as e:
            await context.abort(status_for(e), str(e))

    async def Complete(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        total = pb.GenerateResponse()
        try:
            async for resp in self._run(request, context):
                total.request_id = resp.request_id
                total.token_ids.extend(resp.token_ids)
                total.text += resp.text
                total.logprobs.extend(resp.logprobs)
                if resp.finish_reason:
                    total.finish_reason = resp.finish_reason
                    total.usage.CopyFrom(resp.usage)
                    total.timings.CopyFrom(resp.timings)
                    total.prefill_worker = resp.prefill_worker
                    total.decode_worker = resp.decode_worker
        except RouteError as e:
            await context.abort(e.code, str(e))
        return total
