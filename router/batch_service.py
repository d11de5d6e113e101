"""The Batch service on the router: submit many GenerateRequests as one job, watch it, read its results.

- ``Submit``: the requests are checked for size (as Generation does), stamped with the job's tenant and the
  batch priority (router.classes: background), given ids ``<job_id>-<index>`` when they have none, and stored
  with the job in one transaction (router.batch_store). The job then runs in spare capacity
  (router.batch_runner). At most ``MAX_JOB_REQUESTS`` requests a job.
- ``Get``: status (``running``, ``completed``, ``cancelled``) and progress counts.
- ``Cancel``: stops the job; requests in flight are cancelled (their KV blocks freed), results already stored
  stay readable. Cancelling an ended job changes nothing.
- ``Results``: a stream of the job's stored results.

Delivery, defined: the store writes at most one result per request index, ever (a request re-run after a
router restart cannot write a second one). ``Results`` streams each stored result with index >=
``start_index`` exactly once per call, in index order. Without ``follow`` it streams what is stored now (there
may be gaps: indices still running) and ends. With ``follow`` it streams strictly consecutive indices,
waiting for each next one, and ends after the last index, or, when the job ends (cancelled) with results
missing, after streaming whatever was stored beyond the gap. A client that lost its stream (or the router)
calls again with ``start_index`` = the last index it received + 1, and so receives every result exactly once.

Auth: Batch goes through the router's API keys like Generation (router.auth stamps the key's tenant on each
Batch request); a job is visible only to the tenant that submitted it (any other: NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import grpc

from pdserve.engine import env
from pdserve.engine.errors import InvalidRequestError, PermissionDeniedError, RequestNotFoundError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.batch_runner import BatchRunner
from pdserve.router.batch_store import BatchStore, JobRow
from pdserve.router.classes import BATCH_PRIORITY
from pdserve.router.request import MAX_NAME_LEN, RequestParser
from pdserve.serving.errors import abort_with

logger = logging.getLogger(__name__)

MAX_JOB_REQUESTS = 100_000
PAGE = 256


def default_db_path() -> Path:
    return env.cache_dir() / "batch.sqlite3"


def job_to_proto(job: JobRow) -> pb.BatchJob:
    return pb.BatchJob(job_id=job.job_id, status=job.status, num_requests=job.num_requests,
                       num_succeeded=job.num_succeeded, num_failed=job.num_failed, num_pending=job.num_pending,
                       created_at=job.created_at, finished_at=job.finished_at)


class BatchServicer:
    def __init__(self, db_path: str | Path, respond, membership, max_concurrency: int = 8):
        self.store = BatchStore(db_path)
        self.runner = BatchRunner(self.store, respond, membership, max_concurrency)

    async def start(self) -> None:
        await self.store.run(self.store.open)
        self.runner.start()
        logger.info("batch jobs in %s", self.store.path)

    async def close(self) -> None:
        await self.runner.close()
        await asyncio.to_thread(self.store.shutdown)

    async def _job(self, job_id: str, tenant: str) -> JobRow:
        job = await self.store.run(self.store.job, job_id) if job_id else None
        if job is None or job.tenant != tenant:
            raise RequestNotFoundError(f"job_id: no batch job {job_id[:100]!r} of yours here")
        return job

    # ---- RPCs -------------------------------------------------------------------------------------
    async def Submit(self, request: pb.BatchSubmitRequest, context: grpc.aio.ServicerContext):
        try:
            num = len(request.requests)
            if not 0 < num <= MAX_JOB_REQUESTS:
                raise InvalidRequestError(f"requests: between 1 and {MAX_JOB_REQUESTS} requests, got {num}")
            if len(request.tenant) > MAX_NAME_LEN:  # as Generation's tenant (it is stored and logged)
                raise InvalidRequestError(f"tenant: at most {MAX_NAME_LEN} characters")
            job_id = f"batch-{uuid.uuid4().hex[:16]}"
            blobs = [self._prepared(i, r, request.tenant, job_id) for i, r in enumerate(request.requests)]
            await self.store.run(self.store.create, job_id, request.tenant, blobs, self.runner.owner)
            await self.runner.add(job_id)
            logger.info("[%s] batch job submitted: %d requests (tenant %r)", job_id, num, request.tenant)
            return pb.BatchSubmitResponse(job_id=job_id, num_requests=num)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)

    @staticmethod
    def _prepared(i: int, r: pb.GenerateRequest, tenant: str, job_id: str) -> bytes:
        try:
            RequestParser.check_sizes(r)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"requests[{i}].{e}") from None
        if r.tenant and r.tenant != tenant:
            raise PermissionDeniedError(f"requests[{i}].tenant: a job of tenant {tenant!r} cannot run requests of "
                                        f"tenant {r.tenant[:100]!r}")
        r.tenant, r.priority = tenant, BATCH_PRIORITY
        if not r.request_id:
            r.request_id = f"{job_id}-{i}"
        return r.SerializeToString()

    async def Get(self, request: pb.BatchJobRequest, context: grpc.aio.ServicerContext):
        try:
            return job_to_proto(await self._job(request.job_id, request.tenant))
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)

    async def Cancel(self, request: pb.BatchJobRequest, context: grpc.aio.ServicerContext):
        try:
            job = await self._job(request.job_id, request.tenant)
            if job.status == "running":
                await self.store.run(self.store.cancel, job.job_id)
                self.runner.cancel(job.job_id)
                logger.info("[%s] batch job cancelled", job.job_id)
            return job_to_proto(await self._job(request.job_id, request.tenant))
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)

    async def Results(self, request: pb.BatchResultsRequest, context: grpc.aio.ServicerContext):
        try:
            job = await self._job(request.job_id, request.tenant)
            stream = self._follow(job, request.start_index) if request.follow else self._stored(
                job.job_id, request.start_index)
            async for result in stream:
                yield result
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)

    async def _stored(self, job_id: str, start: int):
        idx = max(0, start)
        while True:
            rows = await self.store.run(self.store.results, job_id, idx, PAGE)
            for i, data in rows:
                yield pb.BatchResult.FromString(data)
                idx = i + 1
            if len(rows) < PAGE:
                return

    async def _follow(self, job: JobRow, start: int):
        idx = max(0, start)
        while idx < job.num_requests:
            changed = self.runner.changed(job.job_id)  # taken before reading: a result stored after is not missed
            before = idx
            for i, data in await self.store.run(self.store.results, job.job_id, idx, PAGE):
                if i != idx:
                    break
                yield pb.BatchResult.FromString(data)
                idx += 1
            if idx > before:
                continue  # read on at once
            job = await self._job(job.job_id, job.tenant)
            if job.status != "running":  # ended with results missing (cancelled): what is stored, then stop
                async for result in self._stored(job.job_id, idx):
                    yield result
                return
            if changed is not None:
                try:
                    await asyncio.wait_for(changed.wait(), timeout=1.0)
                except TimeoutError:
                    pass
            else:  # another router runs it (or it is between claims): poll
                await asyncio.sleep(0.25)
