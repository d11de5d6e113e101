"""One attempt of a request on one (prefill, decode) pair: the decode stream relayed to the client.

The decode worker drives the prefill leg (reserve, have the prefill worker push KV, then decode); the router
forwards the sampling it validated, relays tokens, records what it sent (so a failover can migrate without
duplicating or dropping tokens) and feeds the prefill leg's measurements to the cost model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router import metrics
from pdserve.router.costs import CostModel, topology
from pdserve.router.membership import Worker
from pdserve.router.policy import Decision
from pdserve.router.responses import RequestState, RouterCounters, finish
from pdserve.serving import tracing
from pdserve.serving.cluster_auth import ClusterCredential, method_name
from pdserve.serving.convert import sampling_to_proto, set_stop_reason, stop_reason_of
from pdserve.serving.errors import RpcStatusError

logger = logging.getLogger(__name__)

DECODE = method_name("Decode", "Decode")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


class LegFailure(Exception):
    """One attempt failed in a way another worker may fix. ``busy``: the worker refused for capacity (it is
    not broken, so its circuit stays closed)."""

    def __init__(self, worker: Worker, message: str, busy: bool = False):
        super().__init__(message)
        self.worker = worker
        self.busy = busy


class LoopRef:
    """The serving loop, looked up once: asyncio.get_running_loop() makes a getpid() system call."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop


class DecodeLeg:
    def __init__(self, costs: CostModel, loop: LoopRef, counters: RouterCounters,
                 credential: ClusterCredential | None = None):
        self.costs = costs
        self.loop = loop
        self.counters = counters
        self.credential = credential  # the router's cluster token on every Decode call (None: no cluster secret)
        self._draining: set[asyncio.Task] = set()  # decode streams finishing after their request did

    def final(self, st: RequestState, resp: pb.GenerateResponse, reason: str) -> pb.GenerateResponse:
        first_token_s, total_s = finish(st, resp, reason, time.monotonic())
        # recorded after this turn of the event loop, i.e. once the response is on its way
        self.loop.get().call_soon(
            metrics.observe_finished, first_token_s, total_s, len(st.sent), len(st.prompt), st.num_cached_tokens
        )
        return resp

    async def run(self, st: RequestState, d: Decision, timeout_s: float):
        """Yields client responses; raises LegFailure (retry elsewhere) or RpcStatusError (relay as is)."""
        remaining = st.remaining_tokens
        if remaining <= 0:  # everything was sent before the failure; only the ending was lost
            yield self.final(st, pb.GenerateResponse(request_id=st.client_id), "length")
            return
        decode, prefill = d.decode, d.prefill
        req = st.request
        decode_req = pb.DecodeRequest(
            request_id=f"{st.rid}#{st.attempts}" if st.attempts > 1 else st.rid, token_ids=st.tokens(),
            sampling=sampling_to_proto(req.sampling, num_sent=len(st.sent)), priority=req.priority,
            num_prior_tokens=len(st.sent), prefill_address=prefill.address if prefill is not None else "",
            lora_name=req.lora_name,
        )
        if prefill is None:
            self.counters.local_prefills += 1
        st.t_prefill_start = st.t_prefill_start or time.monotonic()
        st.prefill_worker = prefill.address if prefill is not None else ""
        st.decode_worker = decode.address
        decode.in_flight += 1
        if prefill is not None:
            prefill.in_flight += 1
        first, finished = True, False
        metadata = self.credential.metadata(DECODE, decode_req.request_id) if self.credential is not None else None
        metadata = tracing.with_traceparent(metadata)
        call = decode.stub.Decode(decode_req, timeout=timeout_s, metadata=metadata)
        legs = (decode, prefill) if prefill is not None else (decode,)
        for w in legs:  # a worker found hung cancels the call (router.membership), and it is retried elsewhere
            w.calls.add(call)
        try:
            async for chunk in call:
                if first:
                    first = False
                    if prefill is not None:
                        prefill.in_flight -= 1
                        self._observe(st, prefill, decode, len(decode_req.token_ids), chunk)
                if chunk.token_ids and not st.t_first_token:
                    st.t_first_token = time.monotonic()
                    tracing.record("first_token", tracing.CURRENT.get(), st.t_start, st.t_first_token)
                st.sent.extend(chunk.token_ids)
                metrics.GENERATED_TOKENS.inc(len(chunk.token_ids))
                st.num_cached_tokens = max(st.num_cached_tokens, chunk.num_cached_tokens)
                resp = pb.GenerateResponse(request_id=st.client_id, token_ids=chunk.token_ids, text=chunk.text)
                if req.sampling.prompt_logprobs is not None and len(st.sent) == len(chunk.token_ids):
                    # the first message: the first prompt token too, with no logprob (rank 0)
                    resp.prompt_logprobs.append(pb.PromptLogprob(token_id=st.prompt[0]))
                    resp.prompt_logprobs.extend(chunk.prompt_logprobs)
                if chunk.logprobs:
                    resp.logprobs.extend(chunk.logprobs)
                if chunk.finish_reason:
                    set_stop_reason(resp, stop_reason_of(chunk))
                    self.final(st, resp, chunk.finish_reason)
                    finished = True
                yield resp
                if finished:
                    # The request is complete. Answer the client now instead of after two more round trips
                    # through grpc (end of stream, then status): the decode stream is drained in the background.
                    break
        except grpc.aio.AioRpcError as e:
            trailers = dict(await call.trailing_metadata() or ())
            blamed = prefill if trailers.get("pdserve-failed-role") == "prefill" and prefill else decode
            raise self._failure(blamed, e, trailers) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this request was cancelled (the client went away)
            # the call was cancelled under us: a worker it depends on stopped answering (router.membership), or its
            # channel closed (the worker left the membership). grpc raises CancelledError for both, which would end
            # the handler with no status (the client hangs to its deadline): another worker can take the request
            hung = next((w for w in legs if w.hung), None)
            if hung is not None:
                raise LegFailure(hung, f"{hung.role} worker {hung.address}: stopped answering mid-call") from None
            raise LegFailure(decode, f"decode worker {decode.address}: its channel closed mid-call") from None
        finally:
            for w in legs:
                w.calls.discard(call)
            if first and prefill is not None:
                prefill.in_flight -= 1
            if finished:
                task = self.loop.get().create_task(self._drain(st.rid, call, decode))
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
        self.loop.get().call_soon(
            self._learn, prefill, decode, num_tokens - chunk.num_cached_tokens, chunk.prefill_s,
            chunk.transfer_bytes, chunk.transfer_wall_s,
        )

    def _learn(self, prefill: Worker, decode: Worker, num_uncached: int, prefill_s: float, transfer_bytes: int,
               transfer_wall_s: float) -> None:
        self.costs.observe_prefill(prefill.address, num_uncached, prefill_s)
        self.costs.observe_transfer(topology(prefill.load, decode.load), transfer_bytes, transfer_wall_s)

    @staticmethod
    def _failure(worker: Worker, e: grpc.aio.AioRpcError, trailers: dict) -> Exception:
        msg = f"{worker.role} worker {worker.address}: {e.code().name}: {e.details()}"
        if e.code() in RETRYABLE:
            return LegFailure(worker, msg, busy=e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        relayed = tuple((k, v) for k, v in trailers.items() if k == "retry-after-ms")
        return RpcStatusError(e.code(), msg, relayed)


def timeout_for(time_remaining: Callable[[], float | None] | None, rpc_timeout_s: float) -> float:
    """The decode call's timeout: the client's deadline, capped at ten RPC timeouts."""
    left = time_remaining() if time_remaining is not None else None
    return min(left, rpc_timeout_s * 10) if left is not None else rpc_timeout_s * 10
