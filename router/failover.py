"""The failover/migration loop: route a parsed request, retry or migrate on failure, admit by SLO.

A failed prefill is retried on another prefill worker (or recomputed on the decode worker when none is left);
a decode worker that dies mid-stream is replaced and the request migrates, re-prefilled with prompt + the
tokens already sent, so the client's stream continues with no duplicated or missing tokens. Attempts are
bounded (``max_retries``) with exponential backoff. Failures are domain errors (serving.errors maps them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdserve.engine.errors import UnavailableError
from pdserve.engine.hashing import ROOT_HASH, adapter_extra, hash_block
from pdserve.router import metrics
from pdserve.router.admission import Admission, AdmissionError
from pdserve.router.leg import DecodeLeg, LegFailure, LoopRef, timeout_for
from pdserve.router.membership import Membership, Worker
from pdserve.router.policy import Decision, PairPolicy, RouteRequest
from pdserve.router.request import ClientRequest, check_model_limits
from pdserve.router.responses import RequestState, RouterCounters
from pdserve.serving import tracing

logger = logging.getLogger(__name__)


class Failover:
    def __init__(self, membership: Membership, policy: PairPolicy, admission: Admission | None = None,
                 rpc_timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.05):
        self.membership = membership
        self.policy = policy
        metrics.init_routing(policy.name)
        self.admission = admission or Admission()
        self.rpc_timeout_s = rpc_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.counters = RouterCounters()
        self.leg = DecodeLeg(policy.costs, LoopRef(), self.counters, membership.credential)

    async def run(self, req: ClientRequest, time_remaining: Callable[[], float | None] | None = None):
        """Yields client responses until the request finishes; raises a domain error when it cannot."""
        try:
            self.admission.check_rate(req.tenant)
        except AdmissionError:
            metrics.count_shed("rate_limit", req.priority)
            raise
        self.counters.requests += 1
        st = RequestState.of(req)
        root = tracing.start("generate", tracing.CURRENT.get(), {"pdserve.request_id": st.rid}, st.t_start)
        try:
            excluded: set[str] = set()
            while True:
                t0 = time.monotonic()
                decision = self._decide(st, excluded)
                tracing.record("route_decision", root, t0, time.monotonic(), {
                    "pdserve.policy": self.policy.name, "pdserve.decode": decision.decode.address,
                    "pdserve.prefill": decision.prefill.address if decision.prefill is not None else "",
                    "pdserve.reason": decision.reason})
                if st.attempts == 0:
                    try:
                        self.admission.check_slo(decision.predicted_ttft_s, req.priority)
                    except AdmissionError:
                        metrics.count_shed("slo", req.priority)
                        raise
                outcome = "disaggregated" if decision.prefill is not None else f"local: {decision.reason}"
                metrics.count_routing(self.policy.name, outcome)
                st.attempts += 1
                attempt = tracing.start("attempt", root, {"pdserve.attempt": st.attempts})
                tracing.CURRENT.set(attempt)  # the decode call carries it (this generator runs in the RPC's task)
                try:
                    async for resp in self.leg.run(st, decision, timeout_for(time_remaining, self.rpc_timeout_s)):
                        yield resp
                    return
                except LegFailure as f:
                    attempt.set_attribute("error", str(f))
                    attempt.end()
                    attempt = tracing.NO_SPAN
                    t0 = time.monotonic()
                    migrating = bool(st.sent)
                    await self._recover(st, f, excluded)
                    tracing.record("migration" if migrating else "retry", root, t0, time.monotonic(),
                                   {"pdserve.failed_worker": f.worker.address, "pdserve.num_sent_tokens": len(st.sent)})
                finally:
                    attempt.end()
        finally:
            root.end()

    async def _recover(self, st: RequestState, f: LegFailure, excluded: set[str]) -> None:
        """After a failed attempt: open the worker's circuit, exclude it, and back off (or give up)."""
        if not f.busy:
            self.membership.mark_failed(f.worker)
        excluded.add(f.worker.address)
        if st.attempts > self.max_retries:
            self.counters.failed += 1
            raise UnavailableError(f"{f} (gave up after {st.attempts} attempts)")
        if st.sent:
            self.counters.migrations += 1
            metrics.MIGRATIONS.inc()
            logger.warning("[%s] migrating after %d tokens: %s", st.rid, len(st.sent), f)
        else:
            self.counters.retries += 1
            metrics.RETRIES.inc()
            logger.warning("[%s] retrying: %s", st.rid, f)
        await asyncio.sleep(self.backoff_s * 2 ** (st.attempts - 1))

    # ---- routing ----------------------------------------------------------------------------------
    def _decide(self, st: RequestState, excluded: set[str]) -> Decision:
        """Choose a pair within the request's base-model pools (only workers holding its adapter), then check the
        prompt against the chosen workers' model."""
        model, lora = st.request.base_model or None, st.request.lora_name
        decodes = holding(self.membership.pool("decode", model=model), lora)
        layout = next((lay for lay in map(Worker.layout, decodes) if lay is not None), None)
        hashes = []
        prefills = holding(self.membership.pool("prefill", model=model), lora)
        if layout is not None:
            if self.policy.block_size != layout.block_size:
                self.policy.block_size = layout.block_size
            hashes = self._prefix_hashes(st, layout.block_size, layout.hash_seed)
            prefills = [w for w in prefills if w.layout() in (None, layout)]  # KV moves only between equal layouts
        if excluded:
            prefills = [w for w in prefills if w.address not in excluded]
            decodes = [w for w in decodes if w.address not in excluded]
        if st.attempts == 0:  # admission: a retry or migration of an admitted request is not refused here
            need_blocks = len(st.prompt) // self.policy.block_size + 1
            try:
                decodes = self.admission.with_room(decodes, need_blocks, st.request.priority)
            except AdmissionError:
                metrics.count_shed("capacity", st.request.priority)
                raise
        route = RouteRequest(len(st.prompt) + len(st.sent), hashes, st.request.session_key)
        try:
            decision = self.policy.choose(route, prefills, decodes)
        except LookupError as e:
            known = self.membership.pool("decode", available_only=False, model=model)
            if known:  # an invalid prompt is refused as such, whether or not the pool's workers are up
                check_model_limits(st.prompt, known[0].load)
            raise UnavailableError(f"{e} (after {st.attempts} attempts)" if st.attempts else str(e)) from None
        for worker in (decision.decode, decision.prefill):
            if worker is not None:
                check_model_limits(st.prompt, worker.load)
        return decision

    def _prefix_hashes(self, st: RequestState, block_size: int, seed: int) -> list[int]:
        """The block hashes routing needs: the chain of prompt + sent tokens, up to and including the first
        block no worker holds. Prefix overlap stops at that block, so hashing further could not change any
        score, and an uncached 4k-token prompt costs one hash instead of 256. The chain is kept on the
        request and extended (never recomputed) on retries and migrations."""
        if st.hash_layout != (block_size, seed):  # first attempt (or the pool's layout changed)
            st.hashes, st.hash_layout = [], (block_size, seed)
        hashes, held = st.hashes, self.policy.index.by_hash
        tokens = st.tokens()
        extra = adapter_extra(st.request.lora_name)  # KV under an adapter never matches the base's or another's
        for i in range(len(hashes), len(tokens) // block_size):
            if hashes and hashes[-1] not in held:
                break
            hashes.append(hash_block(hashes[-1] if hashes else ROOT_HASH, tokens[i * block_size:(i + 1) * block_size],
                                     seed, extra))
        return hashes


def holding(workers: list[Worker], lora: str) -> list[Worker]:
    """The workers that can serve adapter ``lora`` (all for the base model): those with it registered, and of
    those the ones that hold it resident when there are any (no adapter swap on the request's path)."""
    if not lora:
        return workers
    registered = [w for w in workers if lora in w.load.adapters]
    resident = [w for w in registered if lora in w.load.resident_adapters]
    return resident or registered
