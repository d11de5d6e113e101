"""Runs batch jobs' requests in the router's spare capacity, at the lowest priority.

Each request of a job goes through the same path as an interactive one (``GenerationServicer.respond``:
parsing, the response cache, admission, routing, failover) with ``priority = BATCH_PRIORITY``, so admission
treats it as background work (router.classes: it only fills spare running slots) and the engines preempt it
for any interactive request (engine.priority).

Concurrency: at most ``max_concurrency`` requests of all jobs at once, and a new one starts only while the
decode pool has a spare batch slot (``spare_slots``: max_num_seqs minus the sequences each decode worker
holds, fresh). When interactive load fills the slots, no new batch request starts; one refused by admission
goes back to the front of its job's queue and the runner backs off (``BACKOFF_S`` doubling to
``MAX_BACKOFF_S``) before starting any other. Other transient failures (no worker, a deadline) are retried up
to ``MAX_ATTEMPTS`` times; a request that fails for good (bad input, or out of attempts) gets an error result.
Jobs run oldest first, each in index order.

Restart: the runner claims the jobs whose lease expired (router.batch_store) every ``CLAIM_INTERVAL_S``, and
runs each claimed job's indices that have no stored result yet.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.batch_store import BatchStore
from pdserve.router.responses import Aggregate
from pdserve.serving.errors import message_for, status_for

logger = logging.getLogger(__name__)

BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
MAX_ATTEMPTS = 5
CLAIM_INTERVAL_S = 1.0
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


def spare_slots(decodes) -> int:
    """Free batch slots in the decode pool, as this router knows it now (a worker that has not reported its
    max_num_seqs counts one)."""
    total = 0
    for w in decodes:
        limit = w.load.max_num_seqs
        total += 1 if limit <= 0 else max(0, limit - w.num_seqs)
    return total


@dataclass(slots=True)
class _Job:
    job_id: str
    pending: deque[int]
    in_flight: dict[int, asyncio.Task] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) when a result lands


class BatchRunner:
    def __init__(self, store: BatchStore, respond, membership, max_concurrency: int = 8):
        self.store = store
        self.respond = respond  # GenerationServicer.respond
        self.membership = membership
        self.max_concurrency = max_concurrency
        self.owner = f"router-{uuid.uuid4().hex[:12]}"
        self.jobs: dict[str, _Job] = {}
        self.wake = asyncio.Event()
        self.backoff_s = 0.0
        self.num_in_flight = 0
        self.num_done = 0
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._loop())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        tasks = [t for job in self.jobs.values() for t in job.in_flight.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # unfinished requests stay pending in the store

    # ---- jobs -------------------------------------------------------------------------------------
    async def add(self, job_id: str) -> None:
        """A job this router just created (it holds the lease)."""
        await self._adopt(job_id)
        self.wake.set()

    async def _adopt(self, job_id: str) -> None:
        if job_id not in self.jobs:
            pending = await self.store.run(self.store.pending, job_id)
            self.jobs[job_id] = _Job(job_id, deque(pending))
            logger.info("[%s] batch job: %d requests to run", job_id, len(pending))

    def cancel(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            for t in job.in_flight.values():
                t.cancel()
            job.changed.set()

    def changed(self, job_id: str) -> asyncio.Event | None:
        job = self.jobs.get(job_id)
        return job.changed if job is not None else None

    # ---- the loop ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        next_claim = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= next_claim:
                next_claim = loop.time() + CLAIM_INTERVAL_S
                await self._claim()
            if self.backoff_s:
                await asyncio.sleep(self.backoff_s)
            self._launch()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=0.05 if self.jobs else CLAIM_INTERVAL_S)
            except TimeoutError:
                pass

    async def _claim(self) -> None:
        try:
            owned = await self.store.run(self.store.claim, self.owner)
        except Exception:  # noqa: BLE001 - a busy or broken database must not stop the loop
            logger.exception("batch: cannot renew leases")
            return
        for job_id in owned:
            await self._adopt(job_id)
        for job_id in [j for j in self.jobs if j not in owned]:  # lost the lease, or the job ended elsewhere
            job = self.jobs[job_id]
            if not job.pending and not job.in_flight:
                del self.jobs[job_id]
            elif job_id not in owned:
                self.cancel(job_id)

    def _launch(self) -> None:
        budget = min(self.max_concurrency - self.num_in_flight, spare_slots(self.membership.pool("decode")))
        for job in list(self.jobs.values()):
            while budget > 0 and job.pending:
                idx = job.pending.popleft()
                job.in_flight[idx] = asyncio.ensure_future(self._run_one(job, idx))
                self.num_in_flight += 1
                budget -= 1

    async def _run_one(self, job: _Job, idx: int) -> None:
        try:
            data = await self.store.run(self.store.request, job.job_id, idx)
            request = pb.GenerateRequest.FromString(data)
            total = Aggregate()
            async for resp in self.respond(request):
                total.add(resp)
            result = pb.BatchResult(index=idx, request_id=request.request_id, response=total.result())
            await self._store(job, idx, True, result)
            self.backoff_s = 0.0
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is a result or a retry
            await self._failed(job, idx, e)
        finally:
            job.in_flight.pop(idx, None)
            self.num_in_flight -= 1
            self.wake.set()

    async def _failed(self, job: _Job, idx: int, e: Exception) -> None:
        attempts = job.attempts[idx] = job.attempts.get(idx, 0) + 1
        code = status_for(e)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED or (code in TRANSIENT and attempts < MAX_ATTEMPTS):
            job.pending.appendleft(idx)
            self.backoff_s = min(MAX_BACKOFF_S, max(BACKOFF_S, self.backoff_s * 2))
            return
        logger.warning("[%s] batch request %d failed: %s", job.job_id, idx, message_for(e))
        result = pb.BatchResult(index=idx, error_code=code.name, error_message=message_for(e)[:1000])
        await self._store(job, idx, False, result)

    async def _store(self, job: _Job, idx: int, ok: bool, result: pb.BatchResult) -> None:
        await self.store.run(self.store.add_result, job.job_id, idx, ok, result.SerializeToString())
        self.num_done += 1
        event, job.changed = job.changed, asyncio.Event()
        event.set()
        if not job.pending and len(job.in_flight) <= 1 and self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]  # the store marked it completed with its last result
