"""The Decode gRPC servicer."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.errors import CapacityError
from pdserve.engine.layout import LayoutFingerprint
from pdserve.kvtransfer.base import FingerprintMismatchError, KVReceiver
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.convert import (
    integrity,
    kv_event_stream,
    load_to_proto,
    logprob_from_proto,
    logprob_to_proto,
    sampling_from_proto,
)
from pdserve.serving.errors import RpcStatusError, abort_with
from pdserve.serving.rpc import TlsConfig, channel

logger = logging.getLogger(__name__)


class PrefillLegError(RpcStatusError):
    """The prefill worker this request was sent to failed; the router should blame it, not us."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message, (("pdserve-failed-role", "prefill"),))


@dataclass(slots=True)
class WorkerIdentity:
    worker_id: str
    address: str
    transfer_backend: str


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(
        self,
        loop: EngineLoop,
        receiver: KVReceiver | None,
        kv_endpoint: str,
        identity: WorkerIdentity,
        transfer_timeout_s: float = 30.0,
        max_reservation_ttl_s: float = 60.0,
        tls: TlsConfig | None = None,
    ):
        self.tls = tls
        self.loop = loop
        self.receiver = receiver
        self.kv_endpoint = kv_endpoint
        self.identity = identity
        self.transfer_timeout_s = transfer_timeout_s
        self.max_reservation_ttl_s = max_reservation_ttl_s
        self.fingerprint: LayoutFingerprint = loop.engine.fingerprint
        self.deadlines: dict[str, float] = {}
        self.draining = False
        self.num_aborted = 0
        self.num_expired = 0
        self.in_flight = 0
        self.prefill_stubs: dict[str, pb_grpc.PrefillStub] = {}

    # ---- reservations -----------------------------------------------------------------------------
    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.ReserveResponse:
        rid = request.request_id
        try:
            if self.draining:
                raise CapacityError("worker is draining")
            if self.receiver is None:
                raise FingerprintMismatchError("this decode worker has no KV receiver")
            if request.fingerprint:
                theirs = LayoutFingerprint.from_json(request.fingerprint)
                if theirs != self.fingerprint:
                    raise FingerprintMismatchError("KV layout mismatch: " + "; ".join(theirs.diff(self.fingerprint)))
            params = sampling_from_proto(request.sampling)
            tokens = list(request.token_ids)

            def reserve(engine):
                engine.validate(tokens, params)
                return engine.reserve(rid, len(tokens))

            block_ids = await self.loop.acall(reserve)
            self.receiver.expect(rid, block_ids)
            ttl = request.ttl_s if 0 < request.ttl_s <= self.max_reservation_ttl_s else self.max_reservation_ttl_s
            self.deadlines[rid] = time.monotonic() + ttl
            logger.debug("[%s] reserved %d blocks", rid, len(block_ids))
            return pb.ReserveResponse(block_ids=block_ids, kv_endpoint=self.kv_endpoint, transfer_id=rid)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        released = await self._release(request.request_id)
        return pb.ReleaseResponse(released=released)

    async def _release(self, rid: str) -> bool:
        self.deadlines.pop(rid, None)
        if self.receiver is not None:
            self.receiver.cancel(rid)
        released = await self.loop.acall(lambda e: e.abort(rid))
        if released:
            self.num_aborted += 1
            logger.info("[%s] released", rid)
        return released

    async def sweep_expired(self, interval_s: float = 0.25) -> None:
        """Free reservations whose Decode call never came (the prefill or router died)."""
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for rid in [r for r, d in self.deadlines.items() if d < now]:
                logger.warning("[%s] reservation expired; freeing its blocks", rid)
                self.num_expired += 1
                await self._release(rid)

    # ---- decoding ---------------------------------------------------------------------------------
    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        self.in_flight += 1
        try:
            params = sampling_from_proto(request.sampling)
            tokens = list(request.token_ids)
            head = pb.DecodeChunk()  # extra fields for the first chunk
            if self.draining and not request.prefilled:
                raise CapacityError("worker is draining")
            if request.prefill_address:
                leg = await self._remote_prefill(rid, tokens, params, request)
                head = pb.DecodeChunk(
                    prefill_worker=request.prefill_address, prefill_s=leg.prefill_s, transfer_s=leg.transfer_s,
                    transfer_bytes=leg.transfer_bytes, transfer_wall_s=leg.transfer_wall_s,
                    transfer_path=leg.transfer_path,
                )
                request.prefilled = True
                request.first_token_id = leg.first_token_id
                request.num_cached_tokens = leg.num_cached_tokens
                if leg.HasField("first_logprob"):
                    request.first_logprob.CopyFrom(leg.first_logprob)
            if request.prefilled:
                self.deadlines.pop(rid, None)
                head.transfer_wait_s = await self._wait_transfer(rid)
                first_lp = logprob_from_proto(request.first_logprob) if request.HasField("first_logprob") else None

                def add(engine):
                    return engine.add_prefilled_request(
                        rid, tokens, request.first_token_id, params, request.priority, first_lp,
                        request.num_cached_tokens, request.num_prior_tokens,
                    )
            else:

                def add(engine):
                    return engine.add_request(rid, tokens, params, request.priority, sample_offset=request.num_prior_tokens)

            async for out in self.loop.stream(rid, add):
                chunk = pb.DecodeChunk(
                    token_ids=out.new_token_ids,
                    text=out.text_delta,
                    finish_reason=out.finish_reason.value if out.finish_reason else "",
                    num_cached_tokens=out.num_cached_tokens,
                )
                for tok, lp in zip(out.new_token_ids, out.logprobs, strict=False):
                    chunk.logprobs.append(logprob_to_proto(tok, lp))
                if head is not None:
                    head.MergeFrom(chunk)
                    chunk, head = head, None
                yield chunk
        except asyncio.CancelledError:
            logger.info("[%s] cancelled (client cancel or deadline); freeing its blocks", rid)
            self.deadlines.pop(rid, None)
            if self.receiver is not None:
                self.receiver.cancel(rid)
            self.loop.abort(rid, time.monotonic())
            self.num_aborted += 1
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await self._release(rid)
            await abort_with(context, e)
        finally:
            self.in_flight -= 1

    async def _remote_prefill(self, rid: str, tokens: list[int], params, request: pb.DecodeRequest):
        """Decode-driven disaggregation: reserve blocks here, have the prefill worker fill them."""
        if self.receiver is None:
            raise FingerprintMismatchError("this decode worker has no KV receiver")

        def reserve(engine):
            engine.validate(tokens, params)
            return engine.reserve(rid, len(tokens))

        block_ids = await self.loop.acall(reserve)
        self.receiver.expect(rid, block_ids)
        stub = self._prefill_stub(request.prefill_address)
        try:
            return await stub.Prefill(
                pb.PrefillRequest(
                    request_id=rid, token_ids=tokens, sampling=request.sampling, priority=request.priority,
                    num_prior_tokens=request.num_prior_tokens,
                    target=pb.KVTarget(endpoint=self.kv_endpoint, block_ids=block_ids, transfer_id=rid),
                ),
                timeout=self.transfer_timeout_s * 4,
            )
        except grpc.aio.AioRpcError as e:
            raise PrefillLegError(e.code(), f"prefill worker {request.prefill_address}: {e.details()}") from None

    def _prefill_stub(self, address: str):
        stub = self.prefill_stubs.get(address)
        if stub is None:
            stub = self.prefill_stubs[address] = pb_grpc.PrefillStub(channel(address, self.tls))
        return stub

    async def _wait_transfer(self, rid: str) -> float:
        t0 = time.monotonic()
        if self.receiver is None:
            raise FingerprintMismatchError("this decode worker has no KV receiver")
        await asyncio.to_thread(self.receiver.wait, rid, self.transfer_timeout_s)
        return time.monotonic() - t0

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.WorkerLoad:
        load = self.load()
        if request.check_integrity:
            load.integrity_error, load.num_live_blocks = await self.loop.acall(integrity)
        return load

    async def KVEvents(self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext):
        async for batch in kv_event_stream(self.loop, self.identity.worker_id):
            yield batch

    def load(self) -> pb.WorkerLoad:
        e = self.loop.engine
        return load_to_proto(
            self.loop.stats,
            worker_id=self.identity.worker_id,
            role="decode",
            address=self.identity.address,
            draining=self.draining,
            fingerprint=self.fingerprint.to_json(),
            kv_endpoint=self.kv_endpoint,
            transfer_backend=self.identity.transfer_backend,
            max_model_len=e.max_model_len,
            vocab_size=e.vocab_size,
            num_aborted=self.num_aborted,
            device=e.config.device,
            last_abort_latency_s=self.loop.last_abort_latency_s,
        )
