"""The Decode gRPC servicer: reserves blocks for KV pushed from a prefill worker, then streams tokens.

Request ownership. A request id on this worker belongs to the principal that claimed it (the caller a cluster
token authenticated, see pdserve.serving.cluster_auth; "" without cluster auth) with a Reserve or a Decode
call, until that reservation or stream ends. Only the owner may Release it or Decode into its reservation; a
Release from anyone else is NOT_FOUND (exactly as for an unknown id), and a Reserve or Decode reusing an id in
use is refused with INVALID_ARGUMENT. Neither ever touches the owner's request: every cleanup checks that the
claim it is about to drop is its own. Every abort (Release, expiry, cancel) ends the request's stream with a
status (the engine loop hands the stream a CancelledError), never silence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

import grpc

from pdserve.decode.claims import Claim, ClaimBook
from pdserve.decode.prefill_client import PrefillClient, PrefillLegError  # noqa: F401  (re-exported)
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.errors import RequestNotFoundError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvtransfer.base import FingerprintMismatchError, KVReceiver
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving import tracing
from pdserve.serving.cluster_auth import caller
from pdserve.serving.convert import (
    fingerprint_from_proto,
    logprob_from_proto,
    logprob_to_proto,
    prompt_logprobs_to_proto,
    sampling_from_proto,
    set_stop_reason,
)
from pdserve.serving.errors import abort_with
from pdserve.serving.rpc import TlsConfig
from pdserve.serving.worker import WorkerIdentity, WorkerServicer

logger = logging.getLogger(__name__)

MAX_RESERVATION_TTL_S = 60.0  # a reservation whose Decode call never comes is freed after this at most


class DecodeServicer(WorkerServicer, pb_grpc.DecodeServicer):
    service = "Decode"

    def __init__(
        self,
        loop: EngineLoop,
        identity: WorkerIdentity,
        receiver: KVReceiver,
        kv_endpoint: str,
        transfer_timeout_s: float = 30.0,
        tls: TlsConfig | None = None,
    ):
        super().__init__(loop, identity)
        self.receiver = receiver
        self.kv_endpoint = kv_endpoint
        self.transfer_timeout_s = transfer_timeout_s
        self.tls = tls
        self.deadlines: dict[str, float] = {}  # reservation -> when it expires unless its Decode call comes
        self.claims = ClaimBook()  # request id -> its owner (see the module docstring)
        self.prefill = PrefillClient(identity, kv_endpoint, tls, transfer_timeout_s * 4)

    # ---- the worker base's hooks ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or bool(self.deadlines)

    def ready_fields(self) -> list[str]:
        return [f"kv={self.kv_endpoint}"]

    def load_fields(self) -> dict:
        return {"kv_endpoint": self.kv_endpoint}

    def background(self) -> list[Coroutine]:
        return [self.sweep_expired()]

    # ---- reservations -----------------------------------------------------------------------------
    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.ReserveResponse:
        rid = request.request_id
        claim = None
        try:
            self.refuse_if_draining()
            if request.HasField("fingerprint"):
                theirs = fingerprint_from_proto(request.fingerprint)
                ours = self.loop.engine.fingerprint
                if theirs != ours:
                    raise FingerprintMismatchError("KV layout mismatch: " + "; ".join(theirs.diff(ours)))
            claim = self.claims.claim(rid, caller(), reserved=True)
            block_ids = await self._reserve(rid, list(request.token_ids), sampling_from_proto(request.sampling),
                                            lora_name=request.lora_name)
            ttl = request.ttl_s if 0 < request.ttl_s <= MAX_RESERVATION_TTL_S else MAX_RESERVATION_TTL_S
            self.deadlines[rid] = time.monotonic() + ttl
            logger.debug("[%s] reserved %d blocks", rid, len(block_ids))
            return pb.ReserveResponse(block_ids=block_ids, kv_endpoint=self.kv_endpoint, transfer_id=rid)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            if claim is not None:
                self.claims.drop(rid, claim)  # nothing was reserved: _reserve raises before it holds blocks
            await abort_with(context, e)

    async def _reserve(self, rid: str, tokens: list[int], params: SamplingParams, priority: int | None = None,
                       lora_name: str = ""):
        """Hold blocks for the prompt's KV (preempting lower classes, engine.reserve), expect the KV there. An
        unknown adapter is refused before any block is held."""
        lora = {"lora_name": lora_name} if lora_name else {}

        def reserve(engine):
            engine.validate(tokens, params)
            return engine.reserve(rid, len(tokens), priority, **lora)

        block_ids = await self.loop.acall(reserve)
        self.receiver.expect(rid, block_ids)
        return block_ids

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        rid = request.request_id
        claim = self.claims.get(rid)
        if claim is None or claim.principal != caller():
            await abort_with(context, RequestNotFoundError(f"request_id: no request {rid[:256]!r} of yours here"))
        self.claims.drop(rid, claim)
        released = await self._release(rid)
        return pb.ReleaseResponse(released=released)

    async def _release(self, rid: str) -> bool:
        """Free ``rid`` (its caller owns it): its reservation, its expected transfer, its engine request, whose
        stream then ends with CANCELLED."""
        self.deadlines.pop(rid, None)
        self.receiver.cancel(rid)
        released = await asyncio.wrap_future(self.loop.abort(rid, time.monotonic()))  # counted in the loop
        if released:
            logger.info("[%s] released", rid)
        return released

    async def sweep_expired(self, interval_s: float = 0.25) -> None:
        """Free reservations whose Decode call never came (the prefill or router died)."""
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for rid in [r for r, d in self.deadlines.items() if d < now]:
                logger.warning("[%s] reservation expired; freeing its blocks", rid)
                claim = self.claims.get(rid)
                if claim is not None and claim.reserved:
                    self.claims.drop(rid, claim)
                await self._release(rid)

    # ---- decoding ---------------------------------------------------------------------------------
    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        claim: Claim | None = None
        span = tracing.start("decode", tracing.from_context(context),
                             {"pdserve.request_id": rid, "pdserve.worker": self.identity.worker_id})
        tracing.CURRENT.set(span)  # this RPC's task: the Prefill call below carries it
        self.in_flight += 1
        try:
            params = sampling_from_proto(request.sampling)
            tokens = list(request.token_ids)
            head = pb.DecodeChunk()  # extra fields for the first chunk
            if not request.prefilled:
                self.refuse_if_draining()  # a prefilled request's KV already sits here: finish it
            claim = self.claims.for_decode(rid, caller(), request.prefilled and not request.prefill_address)
            if request.prefill_address:
                leg = await self._remote_prefill(rid, tokens, params, request)
                head = pb.DecodeChunk(
                    prefill_worker=request.prefill_address, prefill_s=leg.prefill_s, transfer_s=leg.transfer_s,
                    transfer_bytes=leg.transfer_bytes, transfer_wall_s=leg.transfer_wall_s,
                    transfer_path=leg.transfer_path, prompt_logprobs=leg.prompt_logprobs,
                )
                request.prefilled = True
                request.first_token_id = leg.first_token_id
                request.num_cached_tokens = leg.num_cached_tokens
                if leg.HasField("first_logprob"):
                    request.first_logprob.CopyFrom(leg.first_logprob)
            lora = {"lora_name": request.lora_name} if request.lora_name else {}  # the base model: no keyword
            if request.prefilled:
                self.deadlines.pop(rid, None)
                head.transfer_wait_s = await self._wait_transfer(rid)
                tracing.record("kv_transfer_wait", span, time.monotonic() - head.transfer_wait_s, time.monotonic())
                first_lp = logprob_from_proto(request.first_logprob) if request.HasField("first_logprob") else None

                def add(engine):
                    return engine.add_prefilled_request(
                        rid, tokens, request.first_token_id, params, request.priority, first_lp,
                        request.num_cached_tokens, request.num_prior_tokens, **lora,
                    )
            else:

                def add(engine):
                    return engine.add_request(rid, tokens, params, request.priority,
                                              sample_offset=request.num_prior_tokens, **lora)

            t_add = time.monotonic()
            async for out in self.loop.stream(rid, add):
                if head is not None:
                    tracing.record("decode_queue", span, t_add, time.monotonic())
                    span.add_event("first_token")
                chunk = pb.DecodeChunk(
                    token_ids=out.new_token_ids,
                    text=out.text_delta,
                    finish_reason=out.finish_reason.value if out.finish_reason else "",
                    num_cached_tokens=out.num_cached_tokens,
                )
                set_stop_reason(chunk, out.stop_reason)
                if out.prompt_logprobs:  # a local prefill's (a remote one's came with the head)
                    chunk.prompt_logprobs.extend(prompt_logprobs_to_proto(out.prompt_logprobs))
                for tok, lp in zip(out.new_token_ids, out.logprobs, strict=False):
                    chunk.logprobs.append(logprob_to_proto(tok, lp))
                if head is not None:
                    head.MergeFrom(chunk)
                    chunk, head = head, None
                yield chunk
        except asyncio.CancelledError:
            if claim is not None and self.claims.drop(rid, claim):  # never another call's request with the same id
                logger.info("[%s] cancelled (client cancel or deadline); freeing its blocks", rid)
                self.deadlines.pop(rid, None)
                self.receiver.cancel(rid)
                self.loop.abort(rid, time.monotonic())  # counted by the loop as the blocks come free
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status
            if claim is not None and self.claims.drop(rid, claim):
                await self._release(rid)
            await abort_with(context, e)
        finally:
            span.end()
            self.in_flight -= 1
            if claim is not None:
                self.claims.drop(rid, claim)

    async def _remote_prefill(self, rid: str, tokens: list[int], params: SamplingParams, request: pb.DecodeRequest):
        """Decode-driven disaggregation: reserve blocks here, have the prefill worker fill them."""
        block_ids = await self._reserve(rid, tokens, params, request.priority, request.lora_name)
        return await self.prefill.prefill(rid, request, block_ids)

    async def _wait_transfer(self, rid: str) -> float:
        t0 = time.monotonic()
        stats = await asyncio.to_thread(self.receiver.wait, rid, self.transfer_timeout_s)
        t1 = time.monotonic()
        # the receiving end of the KV transfer, under the span the sender's BEGIN named (else this call's)
        tracing.record("kv_receive", stats.traceparent or tracing.CURRENT.get(), t0, t1,
                       {"kv.bytes": stats.num_bytes, "kv.path": stats.path, "kv.resends": stats.resends})
        return t1 - t0
