"""The public Generation servicer: validate, admit, route, orchestrate reserve -> prefill -> decode.

Failover: a failed prefill is retried on another prefill worker (or recomputed on the decode worker when
none is left); a decode worker that dies mid-stream is replaced and the request migrates, re-prefilled
with prompt + the tokens already sent, so the client's stream continues with no duplicated or missing
tokens. Attempts are bounded (``max_retries``) with exponential backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from engine.hashing import block_hashes
from protos import pdserve_pb2 as pb
from protos.convert import sampling_from_proto
from router import metrics
from router.admission import Admission, AdmissionError
from router.costs import topology
from router.membership import Membership, Worker
from router.policy import Decision, PairPolicy, RouteRequest

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_REQUEST_ID_LEN = 256
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


class RouteError(Exception):
    """The request failed for good; carries the status to return."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float = 0.0):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class LegFailure(Exception):
    """One attempt failed in a way another worker may fix."""

    def __init__(self, worker: Worker, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.worker = worker
        self.code = code


@dataclass(slots=True)
class RequestState:
    rid: str
    prompt: list[int]
    request: pb.GenerateRequest
    max_tokens: int
    sent: list[int] = field(default_factory=list)
    t_start: float = field(default_factory=time.monotonic)
    t_prefill_start: float = 0.0
    t_first_token: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    num_cached_tokens: int = 0
    prefill_worker: str = ""
    decode_worker: str = ""
    attempts: int = 0


@dataclass(slots=True)
class RouterCounters:
    requests: int = 0
    retries: int = 0
    migrations: int = 0
    cancelled: int = 0
    local_prefills: int = 0
    failed: int = 0


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
    ):
        self.membership = membership
        self.policy = policy
        self.tokenizer = tokenizer
        self.admission = admission or Admission()
        self.rpc_timeout_s = rpc_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.counters = RouterCounters()

    # ---- validation -------------------------------------------------------------------------------
    def parse(self, request: pb.GenerateRequest):
        """-> (request id, prompt token ids, SamplingParams); raises ValueError naming the bad field."""
        if len(request.request_id) > MAX_REQUEST_ID_LEN:
            raise ValueError(f"request_id: at most {MAX_REQUEST_ID_LEN} characters")
        has_prompt, has_ids = bool(request.prompt), bool(request.token_ids)
        if has_prompt == has_ids:
            what = "both are set" if has_prompt else "prompt is empty and no token_ids were given"
            raise ValueError(f"prompt: set exactly one of prompt or token_ids ({what})")
        if has_prompt:
            if len(request.prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
            token_ids = list(self.tokenizer.encode(request.prompt, add_special_tokens=True))
            if not token_ids:
                raise ValueError("prompt: tokenizes to no tokens")
        else:
            token_ids = list(request.token_ids)
        params = sampling_from_proto(request.sampling)
        limits = [w.load for w in self.membership.pool("decode", available_only=False) if w.load.vocab_size]
        if limits:
            vocab, max_len = limits[0].vocab_size, limits[0].max_model_len
            bad = next((t for t in token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
            if len(token_ids) >= max_len:
                raise ValueError(f"prompt: {len(token_ids)} tokens exceeds the context limit of {max_len - 1}")
        rid = request.request_id or f"req-{uuid.uuid4().hex[:12]}"
        return rid, token_ids, params

    # ---- routing ----------------------------------------------------------------------------------
    def _decide(self, st: RequestState, excluded: set[str]) -> Decision:
        tokens = st.prompt + st.sent
        fp = next((w.load for w in self.membership.pool("decode") if w.load.fingerprint), None)
        hashes = []
        if fp is not None:
            layout = json.loads(fp.fingerprint)
            self.policy.block_size = layout["block_size"]
            hashes = block_hashes(tokens, layout["block_size"], layout["hash_seed"])
        prefills = [w for w in self.membership.pool("prefill") if w.address not in excluded]
        decodes = [w for w in self.membership.pool("decode") if w.address not in excluded]
        session = st.request.session_id or st.request.tenant
        return self.policy.choose(RouteRequest(len(tokens), hashes, session), prefills, decodes)

    async def _run(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            rid, token_ids, params = self.parse(request)
            self.admission.check_rate(request.tenant)
        except ValueError as e:
            raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except AdmissionError as e:
            metrics.SHED.labels("rate_limit").inc()
            raise RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s) from None
        self.counters.requests += 1
        st = RequestState(rid, token_ids, request, params.max_tokens)
        excluded: set[str] = set()
        while True:
            try:
                decision = self._decide(st, excluded)
            except LookupError as e:
                raise RouteError(grpc.StatusCode.UNAVAILABLE, f"{e} (after {st.attempts} attempts)") from None
            if st.attempts == 0:
                try:
                    self.admission.check_slo(decision.predicted_ttft_s, request.priority)
                except AdmissionError as e:
                    metrics.SHED.labels("slo").inc()
                    raise RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s) from None
            outcome = "disaggregated" if decision.prefill is not None else f"local: {decision.reason}"
            metrics.ROUTING.labels(self.policy.name, outcome).inc()
            st.attempts += 1
            try:
                async for resp in self._attempt(st, decision, context):
                    yield resp
                return
            except LegFailure as f:
                if f.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.membership.mark_failed(f.worker)
                excluded.add(f.worker.address)
                if st.attempts > self.max_retries:
                    self.counters.failed += 1
                    raise RouteError(grpc.StatusCode.UNAVAILABLE, f"{f} (gave up after {st.attempts} attempts)") from None
                if st.sent:
                    self.counters.migrations += 1
                    metrics.MIGRATIONS.inc()
                    logger.warning("[%s] migrating after %d tokens: %s", rid, len(st.sent), f)
                else:
                    self.counters.retries += 1
                    metrics.RETRIES.inc()
                    logger.warning("[%s] retrying: %s", rid, f)
                await asyncio.sleep(self.backoff_s * 2 ** (st.attempts - 1))

    async def _attempt(self, st: RequestState, d: Decision, context):
        """One try on one pair. Yields client responses; raises LegFailure or RouteError."""
        remaining = st.max_tokens - len(st.sent)
        tokens = st.prompt + st.sent
        sampling = pb.SamplingParams()
        sampling.CopyFrom(st.request.sampling)
        sampling.max_tokens = remaining
        if remaining <= 0:  # everything was sent before the failure; only the ending was lost
            yield self._final(st, pb.GenerateResponse(request_id=st.rid), "length")
            return
        decode = d.decode
        decode_req = pb.DecodeRequest(
            request_id=f"{st.rid}#{st.attempts}" if st.attempts > 1 else st.rid,
            token_ids=tokens, sampling=sampling, priority=st.request.priority, num_prior_tokens=len(st.sent),
        )
        prefill = d.prefill
        if prefill is not None:
            decode_req.prefill_address = prefill.address
        else:
            self.counters.local_prefills += 1
        st.t_prefill_start = st.t_prefill_start or time.monotonic()
        st.prefill_worker = prefill.address if prefill is not None else ""
        st.decode_worker = decode.address
        decode.in_flight += 1
        if prefill is not None:
            prefill.in_flight += 1
        first = True
        call = decode.stub.Decode(decode_req, timeout=self._remaining(context))
        try:
            async for chunk in call:
                if first:
                    first = False
                    if prefill is not None:
                        prefill.in_flight -= 1
                        self._observe(st, prefill, decode, decode_req, chunk)
                if chunk.token_ids and not st.t_first_token:
                    st.t_first_token = time.monotonic()
                st.sent.extend(chunk.token_ids)
                st.num_cached_tokens = max(st.num_cached_tokens, chunk.num_cached_tokens)
                resp = pb.GenerateResponse(
                    request_id=st.rid, token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs
                )
                if chunk.finish_reason:
                    self._final(st, resp, chunk.finish_reason)
                yield resp
        except grpc.aio.AioRpcError as e:
            trailers = dict(await call.trailing_metadata() or ())
            blamed = prefill if trailers.get("pdserve-failed-role") == "prefill" and prefill else decode
            raise self._failure(blamed, e) from None
        finally:
            decode.in_flight -= 1
            if first and prefill is not None:
                prefill.in_flight -= 1
            call.cancel()

    def _observe(self, st: RequestState, prefill: Worker, decode: Worker, req: pb.DecodeRequest, chunk) -> None:
        """Feed the prefill leg's measurements to the cost model and the request's timings."""
        st.prefill_s += chunk.prefill_s
        st.transfer_s += chunk.transfer_s
        st.num_cached_tokens = max(st.num_cached_tokens, chunk.num_cached_tokens)
        self.policy.costs.observe_prefill(prefill.address, len(req.token_ids) - chunk.num_cached_tokens, chunk.prefill_s)
        self.policy.costs.observe_transfer(
            topology(prefill.load, decode.load), chunk.transfer_bytes, chunk.transfer_wall_s
        )

    def _failure(self, worker: Worker, e: grpc.aio.AioRpcError) -> Exception:
        msg = f"{worker.role} worker {worker.address}: {e.code().name}: {e.details()}"
        if e.code() in RETRYABLE:
            return LegFailure(worker, e.code(), msg)
        return RouteError(e.code(), msg)

    def _remaining(self, context) -> float:
        left = context.time_remaining() if context is not None else None
        return min(left, self.rpc_timeout_s * 10) if left is not None else self.rpc_timeout_s * 10

    def _final(self, st: RequestState, resp: pb.GenerateResponse, reason: str) -> pb.GenerateResponse:
        now = time.monotonic()
        resp.finish_reason = reason
        resp.usage.CopyFrom(pb.Usage(
            prompt_tokens=len(st.prompt), completion_tokens=len(st.sent), cached_prompt_tokens=st.num_cached_tokens
        ))
        resp.prefill_worker = st.prefill_worker
        resp.decode_worker = st.decode_worker
        resp.timings.CopyFrom(pb.Timings(
            queue_s=max(0.0, (st.t_prefill_start or now) - st.t_start),
            prefill_s=st.prefill_s,
            transfer_s=st.transfer_s,
            first_token_s=(st.t_first_token or now) - st.t_start,
            total_s=now - st.t_start,
        ))
        metrics.observe_finished(
            resp.timings.first_token_s, resp.timings.total_s, len(st.sent), len(st.prompt), st.num_cached_tokens
        )
        return resp

    # ---- RPCs -------------------------------------------------------------------------------------
    async def _abort(self, context, e: RouteError) -> None:
        if e.retry_after_s:
            context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
        await context.abort(e.code, str(e))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for resp in self._run(request, context):
                yield resp
            metrics.REQUESTS.labels("OK").inc()
        except RouteError as e:
            metrics.REQUESTS.labels(e.code.name).inc()
            await self._abort(context, e)
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            metrics.CANCELLED.inc()
            metrics.REQUESTS.labels("CANCELLED").inc()
            raise

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
            metrics.REQUESTS.labels(e.code.name).inc()
            await self._abort(context, e)
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            metrics.CANCELLED.inc()
            metrics.REQUESTS.labels("CANCELLED").inc()
            raise
        metrics.REQUESTS.labels("OK").inc()
        return total
