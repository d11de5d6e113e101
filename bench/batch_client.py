"""A small client of the router's Batch service (public API): submit a job, watch it, read its results.

``read_all`` reads a job's results exactly once even across router restarts: it follows the stream and,
when the stream breaks (the router went away), calls again from the last index it got + 1
(router.batch_service defines the delivery guarantee).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import bearer

RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
               grpc.StatusCode.DEADLINE_EXCEEDED}


class BatchClient:
    def __init__(self, address: str, api_key: str = "", timeout_s: float = 30.0):
        self.address = address
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.BatchStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def submit(self, requests: Sequence[pb.GenerateRequest]) -> str:
        resp = await self.stub.Submit(pb.BatchSubmitRequest(requests=list(requests)), metadata=bearer(self.api_key),
                                      timeout=self.timeout_s)
        return resp.job_id

    async def get(self, job_id: str) -> pb.BatchJob:
        return await self.stub.Get(pb.BatchJobRequest(job_id=job_id), metadata=bearer(self.api_key),
                                   timeout=self.timeout_s)

    async def cancel(self, job_id: str) -> pb.BatchJob:
        return await self.stub.Cancel(pb.BatchJobRequest(job_id=job_id), metadata=bearer(self.api_key),
                                      timeout=self.timeout_s)

    async def results(self, job_id: str, start_index: int = 0, follow: bool = False,
                      timeout_s: float | None = None) -> list[pb.BatchResult]:
        req = pb.BatchResultsRequest(job_id=job_id, start_index=start_index, follow=follow)
        call = self.stub.Results(req, metadata=bearer(self.api_key), timeout=timeout_s or self.timeout_s)
        return [r async for r in call]

    async def wait(self, job_id: str, timeout_s: float = 300.0, poll_s: float = 0.2, on_poll=None) -> pb.BatchJob:
        """Poll ``Get`` until the job has ended; tolerates the router being away (restarts) until the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                job = await self.get(job_id)
                if on_poll is not None:
                    on_poll(job)
                if job.status != "running":
                    return job
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch job {job_id} still running after {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)

    async def read_all(self, job_id: str, timeout_s: float = 300.0, sink: list | None = None
                       ) -> tuple[list[pb.BatchResult], int]:
        """Every result, each once, in index order, resuming after broken streams; -> (results, num_resumes).
        ``sink``: the list to append to (watch it grow while this runs)."""
        deadline = time.monotonic() + timeout_s
        got: list[pb.BatchResult] = sink if sink is not None else []
        resumes = 0
        while True:
            start = got[-1].index + 1 if got else 0
            req = pb.BatchResultsRequest(job_id=job_id, start_index=start, follow=True)
            try:
                async for r in self.stub.Results(req, metadata=bearer(self.api_key),
                                                 timeout=max(1.0, deadline - time.monotonic())):
                    got.append(r)
                return got, resumes
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRY_CODES or time.monotonic() > deadline:
                    raise
                resumes += 1
                await asyncio.sleep(0.2)
