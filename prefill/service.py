"""The Prefill gRPC servicer: runs the prompt, pushes each layer's KV as it is computed, returns token 1."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
import torch

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.errors import CapacityError, InvalidRequestError
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.kvtransfer.base import KVSender, TransferError, TransferHandle
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.convert import (
    integrity,
    kv_event_stream,
    load_to_proto,
    logprob_to_proto,
    sampling_from_proto,
)
from pdserve.serving.errors import abort_with
from pdserve.serving.observability import record_transfer, record_transfer_failure

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TransferPlan:
    handle: TransferHandle
    dst_block_ids: list[int]
    started: bool = False
    t_first_push: float | None = None


@dataclass(slots=True)
class PrefillIdentity:
    worker_id: str
    address: str
    transfer_backend: str
    extra: dict = field(default_factory=dict)


class LayerPusher:
    """Builds the per-step layer hook: after layer L's KV is written, queue those blocks to the decode side.

    Runs on the engine thread. The first chunk of a request also sends its prefix-cached blocks.
    """

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.cuda = device.type == "cuda"
        self.plans: dict[str, TransferPlan] = {}

    def __call__(self, scheduled: list[ScheduledSeq]):
        work = []
        for s in scheduled:
            plan = self.plans.get(s.seq.request_id)
            if plan is None:
                continue
            first = s.seq.num_computed_tokens // self.block_size if plan.started else 0
            last = (s.seq.num_computed_tokens + s.num_new_tokens - 1) // self.block_size
            idx = range(first, min(last + 1, len(plan.dst_block_ids)))
            plan.started = True
            if plan.t_first_push is None:
                plan.t_first_push = time.monotonic()
            work.append((plan.handle, [s.seq.block_ids[i] for i in idx], [plan.dst_block_ids[i] for i in idx]))
        if not work:
            return None

        failed: set[int] = set()

        def hook(layer: int) -> None:
            ready = None
            if self.cuda:
                ready = torch.cuda.Event()
                ready.record()
            for i, (handle, src, dst) in enumerate(work):
                if i in failed:
                    continue
                try:
                    handle.push_layer(layer, src, dst, ready)
                except TransferError:
                    # that transfer's link died: its own Prefill call reports it at finish(); the rest of
                    # the batch (other requests, other decode workers) keeps computing and pushing
                    failed.add(i)

        return hook


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, loop: EngineLoop, sender: KVSender, identity: PrefillIdentity, transfer_timeout_s: float = 30.0):
        self.loop = loop
        self.sender = sender
        self.identity = identity
        self.transfer_timeout_s = transfer_timeout_s
        engine = loop.engine
        self.pusher = LayerPusher(engine.config.block_size, engine.runner.device)
        engine.layer_hook_factory = self.pusher
        self.draining = False
        self.in_flight = 0
        self.num_aborted = 0

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        rid = request.request_id
        t_arrive = time.monotonic()
        handle: TransferHandle | None = None
        self.in_flight += 1
        try:
            if self.draining:
                raise CapacityError("worker is draining")
            params = sampling_from_proto(request.sampling)
            tokens = list(request.token_ids)
            target = request.target
            bs = self.loop.engine.config.block_size
            want = (len(tokens) + bs - 1) // bs
            if len(target.block_ids) != want:
                raise InvalidRequestError(
                    f"target.block_ids: {len(target.block_ids)} blocks given, the prompt needs {want}"
                )
            handle = await asyncio.to_thread(
                self.sender.open, target.transfer_id or rid, target.endpoint, list(target.block_ids)
            )
            plan = TransferPlan(handle, list(target.block_ids))

            def add(engine):
                engine.validate(tokens, params)
                self.pusher.plans[rid] = plan
                return engine.add_request(
                    rid, tokens, params, request.priority, prefill_only=True, sample_offset=request.num_prior_tokens
                )

            first = None
            async for out in self.loop.stream(rid, add):
                first = out
            t_computed = time.monotonic()
            try:
                stats = await asyncio.to_thread(handle.finish, self.transfer_timeout_s)
            except Exception:
                record_transfer_failure(target.endpoint)
                raise
            handle = None
            t_done = time.monotonic()
            t_start = plan.t_first_push or t_arrive
            record_transfer(target.endpoint, stats.path, stats.num_bytes, t_done - t_start)
            resp = pb.PrefillResponse(
                first_token_id=first.new_token_ids[0],
                num_cached_tokens=first.num_cached_tokens,
                queue_s=t_start - t_arrive,
                prefill_s=t_computed - t_start,
                transfer_s=t_done - t_computed,
                transfer_wall_s=t_done - t_start,
                transfer_bytes=stats.num_bytes,
                worker_id=self.identity.worker_id,
                transfer_path=stats.path,
            )
            if first.logprobs:
                resp.first_logprob.CopyFrom(logprob_to_proto(first.new_token_ids[0], first.logprobs[0]))
            logger.info(
                "[%s] prefilled %d tokens (%d cached), pushed %d bytes via %s",
                rid, len(tokens), first.num_cached_tokens, stats.num_bytes, stats.path,
            )
            return resp
        except asyncio.CancelledError:
            logger.info("[%s] prefill cancelled", rid)
            self.num_aborted += 1
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)
        finally:
            self.in_flight -= 1
            if handle is not None:
                handle.abort("prefill did not complete")
            self.loop.call(lambda e: self._cleanup(e, rid))

    def _cleanup(self, engine, rid: str) -> None:
        self.pusher.plans.pop(rid, None)
        engine.abort(rid)  # frees held blocks (release) or a still-running prefill

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
            role="prefill",
            address=self.identity.address,
            draining=self.draining,
            fingerprint=e.fingerprint.to_json(),
            transfer_backend=self.identity.transfer_backend,
            max_model_len=e.max_model_len,
            vocab_size=e.vocab_size,
            num_aborted=self.num_aborted,
            device=e.config.device,
            last_abort_latency_s=self.loop.last_abort_latency_s,
        )
