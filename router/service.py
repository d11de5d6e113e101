"""The public Generation servicer: validate, admit, route, orchestrate reserve -> prefill -> decode.

Failover: a failed prefill is retried on another prefill worker (or recomputed on the decode worker when
none is left); a decode worker that dies mid-stream is replaced and the request migrates, re-prefilled
with prompt + the tokens already sent, so the client's stream continues with no duplicated or missing
tokens. Attempts are bounded (``max_retries``) with exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from pdserve.engine.hashing import ROOT_HASH, hash_block
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router import metrics
from pdserve.router.admission import Admission, AdmissionError
from pdserve.router.costs import topology
from pdserve.router.membership import Membership, Worker
from pdserve.router.policy import Decision, PairPolicy, RouteRequest
from pdserve.serving.convert import sampling_from_proto

if TYPE_CHECKING:
    from pdserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_REQUEST_ID_LEN = 256
SAMPLING_CACHE_SIZE = 1024  # distinct sampling settings kept validated (most traffic shares a handful)
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
    hashes: list[int] = field(default_factory=list)  # leading block hashes of prompt + sent (see _prefix_hashes)
    hash_layout: tuple[int, int] = (0, 0)  # (block_size, hash_seed) ``hashes`` were computed with
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
        self._rid_rng = random.Random()  # seeded from os.urandom; no syscall per request id
        self._draining: set[asyncio.Task] = set()  # decode streams finishing after their request did
        self._sampling: dict[bytes, SamplingParams] = {}  # serialized SamplingParams -> validated
        self._loop: asyncio.AbstractEventLoop | None = None

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The serving loop, looked up once: asyncio.get_running_loop() makes a getpid() system call."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

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
        params = self._sampling_params(request.sampling)
        limits = next((w.load for w in self.membership.workers.values() if w.role == "decode" and w.load.vocab_size),
                      None)
        if limits is not None:
            vocab, max_len = limits.vocab_size, limits.max_model_len
            if min(token_ids) < 0 or max(token_ids) >= vocab:  # C-speed check; find the culprit only on failure
                bad = next(t for t in token_ids if not 0 <= t < vocab)
                raise ValueError(f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
            if len(token_ids) >= max_len:
                raise ValueError(f"prompt: {len(token_ids)} tokens exceeds the context limit of {max_len - 1}")
        rid = request.request_id or f"req-{self._rid_rng.getrandbits(48):012x}"
        return rid, token_ids, params

    def _sampling_params(self, msg: pb.SamplingParams) -> SamplingParams:
        """sampling_from_proto, validated once per distinct setting (SamplingParams is frozen, so shared)."""
        key = msg.SerializeToString()
        params = self._sampling.get(key)
        if params is None:
            params = sampling_from_proto(msg)  # raises ValueError naming the field; failures are not cached
            if len(self._sampling) >= SAMPLING_CACHE_SIZE:
                self._sampling.clear()
            self._sampling[key] = params
        return params

    # ---- routing ----------------------------------------------------------------------------------
    def _decide(self, st: RequestState, excluded: set[str]) -> Decision:
        decodes = self.membership.pool("decode")
        layout = next((lay for lay in map(Worker.layout, decodes) if lay is not None), None)
        hashes = []
        if layout is not None:
            block_size, seed = layout.block_size, layout.hash_seed
            if self.policy.block_size != block_size:
                self.policy.block_size = block_size
            hashes = self._prefix_hashes(st, block_size, seed)
        prefills = self.membership.pool("prefill")
        if excluded:
            prefills = [w for w in prefills if w.address not in excluded]
            decodes = [w for w in decodes if w.address not in excluded]
        session = st.request.session_id or st.request.tenant
        return self.policy.choose(RouteRequest(len(st.prompt) + len(st.sent), hashes, session), prefills, decodes)

    def _prefix_hashes(self, st: RequestState, block_size: int, seed: int) -> list[int]:
        """The block hashes routing needs: the chain of prompt + sent tokens, up to and including the first
        block no worker holds. Prefix overlap stops at that block, so hashing further could not change any
        score, and an uncached 4k-token prompt costs one hash instead of 256. The chain is kept on the
        request and extended (never recomputed) on retries and migrations."""
        if st.hash_layout != (block_size, seed):  # first attempt (or the pool's layout changed)
            st.hashes, st.hash_layout = [], (block_size, seed)
        hashes, held = st.hashes, self.policy.index.by_hash
        tokens = st.prompt + st.sent if st.sent else st.prompt
        for i in range(len(hashes), len(tokens) // block_size):
            if hashes and hashes[-1] not in held:
                break
            hashes.append(hash_block(hashes[-1] if hashes else ROOT_HASH, tokens[i * block_size:(i + 1) * block_size],
                                     seed))
        return hashes

    async def _run(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            rid, token_ids, params = self.parse(request)
            self.admission.check_rate(request.tenant)
        except ValueError as e:
            raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except AdmissionError as e:
            metrics.count_shed("rate_limit")
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
                    metrics.count_shed("slo")
                    raise RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s) from None
            outcome = "disaggregated" if decision.prefill is not None else f"local: {decision.reason}"
            metrics.count_routing(self.policy.name, outcome)
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
        if remaining <= 0:  # everything was sent before the failure; only the ending was lost
            yield self._final(st, pb.GenerateResponse(request_id=st.rid), "length")
            return
        decode = d.decode
        decode_req = pb.DecodeRequest(
            request_id=f"{st.rid}#{st.attempts}" if st.attempts > 1 else st.rid,
            token_ids=st.prompt + st.sent if st.sent else st.prompt, sampling=st.request.sampling,
            priority=st.request.priority, num_prior_tokens=len(st.sent),
        )
        decode_req.sampling.max_tokens = remaining
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
        first, finished = True, False
        call = decode.stub.Decode(decode_req, timeout=self._remaining(context))
        try:
            async for chunk in call:
                if first:
                    first = False
                    if prefill is not None:
                        prefill.in_flight -= 1
                        self._observe(st, prefill, decode, len(decode_req.token_ids), chunk)
                if chunk.token_ids and not st.t_first_token:
                    st.t_first_token = time.monotonic()
                st.sent.extend(chunk.token_ids)
                st.num_cached_tokens = max(st.num_cached_tokens, chunk.num_cached_tokens)
                resp = pb.GenerateResponse(request_id=st.rid, token_ids=chunk.token_ids, text=chunk.text)
                if chunk.logprobs:
                    resp.logprobs.extend(chunk.logprobs)
                if chunk.finish_reason:
                    self._final(st, resp, chunk.finish_reason)
                    finished = True
                yield resp
                if finished:
                    # The request is complete. Answer the client now instead of after two more round trips
                    # through grpc (end of stream, then status): the decode stream is drained in the background.
                    break
        except grpc.aio.AioRpcError as e:
            trailers = dict(await call.trailing_metadata() or ())
            blamed = prefill if trailers.get("pdserve-failed-role") == "prefill" and prefill else decode
            raise self._failure(blamed, e) from None
        finally:
            if first and prefill is not None:
                prefill.in_flight -= 1
            if finished:
                task = self._event_loop().create_task(self._drain(st.rid, call, decode))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            else:
                decode.in_flight -= 1
                call.cancel()

    @staticmethod
    async def _drain(rid: str, call, decode: Worker) -> None:
        """Read a finished request's decode stream to its status (nothing is left to relay), then free the
        worker's in-flight slot. The call is never cancelled, so the worker sees a clean end."""
        try:
            async for chunk in call:
                if chunk.token_ids:
                    logger.warning("[%s] decode worker %s sent %d tokens after finishing; dropped",
                                   rid, decode.address, len(chunk.token_ids))
        except grpc.aio.AioRpcError as e:
            logger.debug("[%s] decode stream ended with %s after finishing", rid, e.code().name)
        finally:
            decode.in_flight -= 1

    def _observe(self, st: RequestState, prefill: Worker, decode: Worker, num_tokens: int, chunk) -> None:
        """Feed the prefill leg's measurements to the request's timings, and (after this turn of the event
        loop, off the response's path) to the cost model."""
        st.prefill_s += chunk.prefill_s
        st.transfer_s += chunk.transfer_s
        st.num_cached_tokens = max(st.num_cached_tokens, chunk.num_cached_tokens)
        self._event_loop().call_soon(
            self._learn, prefill, decode, num_tokens - chunk.num_cached_tokens, chunk.prefill_s,
            chunk.transfer_bytes, chunk.transfer_wall_s,
        )

    def _learn(self, prefill: Worker, decode: Worker, num_uncached: int, prefill_s: float, transfer_bytes: int,
               transfer_wall_s: float) -> None:
        self.policy.costs.observe_prefill(prefill.address, num_uncached, prefill_s)
        self.policy.costs.observe_transfer(topology(prefill.load, decode.load), transfer_bytes, transfer_wall_s)

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
        usage = resp.usage
        usage.prompt_tokens = len(st.prompt)
        usage.completion_tokens = len(st.sent)
        usage.cached_prompt_tokens = st.num_cached_tokens
        resp.prefill_worker = st.prefill_worker
        resp.decode_worker = st.decode_worker
        first_token_s, total_s = (st.t_first_token or now) - st.t_start, now - st.t_start
        timings = resp.timings
        timings.queue_s = max(0.0, (st.t_prefill_start or now) - st.t_start)
        timings.prefill_s = st.prefill_s
        timings.transfer_s = st.transfer_s
        timings.first_token_s = first_token_s
        timings.total_s = total_s
        # recorded after this turn of the event loop, i.e. once the response is on its way
        self._event_loop().call_soon(
            metrics.observe_finished, first_token_s, total_s, len(st.sent), len(st.prompt), st.num_cached_tokens
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
            metrics.count_request("OK")
        except RouteError as e:
            metrics.count_request(e.code.name)
            await self._abort(context, e)
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            metrics.CANCELLED.inc()
            metrics.count_request("CANCELLED")
            raise

    async def Complete(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        total = None
        texts: list[str] = []  # joined once at the end: += on a proto string field is quadratic
        try:
            async for resp in self._run(request, context):
                if total is None:  # usually the only chunk of a short completion: take it as it is
                    total = resp
                else:
                    total.request_id = resp.request_id
                    total.token_ids.extend(resp.token_ids)
                    total.logprobs.extend(resp.logprobs)
                    if resp.finish_reason:
                        total.finish_reason = resp.finish_reason
                        total.usage.CopyFrom(resp.usage)
                        total.timings.CopyFrom(resp.timings)
                        total.prefill_worker = resp.prefill_worker
                        total.decode_worker = resp.decode_worker
                texts.append(resp.text)
        except RouteError as e:
            metrics.count_request(e.code.name)
            await self._abort(context, e)
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            metrics.CANCELLED.inc()
            metrics.count_request("CANCELLED")
            raise
        metrics.count_request("OK")
        if total is None:
            return pb.GenerateResponse()
        if len(texts) > 1:
            total.text = "".join(texts)
        return total
