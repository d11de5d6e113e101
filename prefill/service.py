"""The Prefill gRPC servicer: runs the prompt, pushes each layer's KV as it is computed, returns token 1."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.errors import InvalidRequestError
from pdserve.kvtransfer.base import KVSender, TransferHandle
from pdserve.prefill.pusher import LayerPusher, TransferPlan
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving import tracing
from pdserve.serving.convert import logprob_to_proto, prompt_logprobs_to_proto, sampling_from_proto
from pdserve.serving.errors import abort_with
from pdserve.serving.worker import WorkerIdentity, WorkerServicer
from pdserve.serving.worker_metrics import (
    peer_label,
    record_transfer,
    record_transfer_failure,
    record_transfer_resend,
    register_transfer_metrics,
)

logger = logging.getLogger(__name__)


class PrefillServicer(WorkerServicer, pb_grpc.PrefillServicer):
    service = "Prefill"

    def __init__(
        self,
        loop: EngineLoop,
        identity: WorkerIdentity,
        sender: KVSender,
        pusher: LayerPusher,
        transfer_timeout_s: float = 30.0,
    ):
        super().__init__(loop, identity)
        self.sender = sender
        self.pusher = pusher  # the engine's KV connector: the plans it pushes by
        self.transfer_timeout_s = transfer_timeout_s
        register_transfer_metrics()

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        rid = request.request_id
        t_arrive = time.monotonic()
        handle: TransferHandle | None = None
        plan: TransferPlan | None = None
        span = tracing.start("prefill", tracing.from_context(context),
                             {"pdserve.request_id": rid, "pdserve.worker": self.identity.worker_id}, t_arrive)
        self.in_flight += 1
        try:
            self.refuse_if_draining()
            params = sampling_from_proto(request.sampling)
            tokens = list(request.token_ids)
            target = request.target
            bs = self.loop.engine.config.block_size
            want = (len(tokens) + bs - 1) // bs
            if len(target.block_ids) != want:
                raise InvalidRequestError(
                    f"target.block_ids: {len(target.block_ids)} blocks given, the prompt needs {want}"
                )
            handle = await asyncio.to_thread(  # BEGIN carries our traceparent: the receiver's span joins the trace
                self.sender.open, target.transfer_id or rid, target.endpoint, list(target.block_ids),
                tracing.traceparent(span),
            )
            plan = TransferPlan(handle, list(target.block_ids))
            peer = peer_label(target.worker_id, target.endpoint)

            lora = {"lora_name": request.lora_name} if request.lora_name else {}  # the base model: no keyword

            def add(engine):
                seq = engine.add_request(  # validates (an unknown adapter: not found); refuses an id already in use
                    rid, tokens, params, request.priority, prefill_only=True, sample_offset=request.num_prior_tokens,
                    **lora,
                )
                self.pusher.plans[rid] = plan  # from now on this call owns ``rid`` (see _cleanup)
                return seq

            first = None
            async for out in self.loop.stream(rid, add):
                first = out
            t_computed = time.monotonic()
            try:
                stats = await asyncio.to_thread(handle.finish, self.transfer_timeout_s)
            except Exception:
                record_transfer_failure(self.identity.worker_id, peer)
                raise
            finally:
                record_transfer_resend(self.identity.worker_id, peer, handle.resends)
            handle = None
            t_done = time.monotonic()
            t_start = plan.t_first_push or t_arrive
            record_transfer(self.identity.worker_id, peer, stats.path, stats.num_bytes, t_done - t_start)
            tracing.record("prefill_queue", span, t_arrive, t_start)
            tracing.record("prefill_compute", span, t_start, t_computed)
            tracing.record("kv_transfer", span, t_start, t_done,
                           {"kv.bytes": stats.num_bytes, "kv.path": stats.path, "kv.peer": peer})
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
            if first.prompt_logprobs:
                resp.prompt_logprobs.extend(prompt_logprobs_to_proto(first.prompt_logprobs))
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
            span.end()
            self.in_flight -= 1
            if handle is not None:
                handle.abort("prefill did not complete")
            if plan is not None:
                self.loop.call(lambda e: self._cleanup(e, rid, plan))

    def _cleanup(self, engine, rid: str, plan: TransferPlan) -> None:
        """On the engine thread, after ``add`` (FIFO). A call that never got ``rid`` (e.g. a duplicate id)
        leaves alone the request that has it."""
        if self.pusher.plans.get(rid) is plan:
            del self.pusher.plans[rid]
            engine.abort(rid)  # frees held blocks (release) or a still-running prefill
