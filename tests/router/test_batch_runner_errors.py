"""Batch bad input: a request that fails for good stores the one-line message Generate would give; Submit checks
the tenant as Generate does."""

from __future__ import annotations

import asyncio
from collections import deque

from pdserve.engine.errors import AdapterNotFoundError, InvalidRequestError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.batch_runner import BatchRunner, _Job
from pdserve.router.batch_store import BatchStore
from pdserve.serving.errors import message_for


def test_a_failed_request_stores_the_interactive_message_not_a_key_errors_repr(tmp_path):
    store = BatchStore(tmp_path / "jobs.sqlite3")
    errors = [AdapterNotFoundError("model: 'nope' is not served here"), InvalidRequestError("max_tokens: bad")]

    async def go():
        await store.run(store.open)
        runner = BatchRunner(store, respond=None, membership=None)
        await store.run(store.create, "job-1", "alice", [b"", b""], runner.owner)
        job = _Job("job-1", deque())
        for idx, e in enumerate(errors):
            await runner._failed(job, idx, e)
        return [pb.BatchResult.FromString(data) for _, data in await store.run(store.results, "job-1", 0, 10)]

    try:
        results = asyncio.run(go())
    finally:
        store.shutdown()
    assert [r.error_code for r in results] == ["NOT_FOUND", "INVALID_ARGUMENT"]
    assert results[0].error_message == "model: 'nope' is not served here" == message_for(errors[0])
    assert results[1].error_message == "max_tokens: bad"


class _Aborted(Exception):
    pass


class _Context:
    async def abort(self, code, details):
        raise _Aborted(code, details)

    def set_trailing_metadata(self, md):
        pass


def test_submit_refuses_a_tenant_longer_than_generate_accepts(tmp_path):
    import grpc
    import pytest

    from pdserve.router.batch_service import BatchServicer

    svc = BatchServicer(tmp_path / "jobs.sqlite3", respond=None, membership=None)
    req = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=1))

    async def go():
        await svc.store.run(svc.store.open)
        with pytest.raises(_Aborted) as info:
            await svc.Submit(pb.BatchSubmitRequest(requests=[req], tenant="t" * 257), _Context())
        return info.value.args

    try:
        code, details = asyncio.run(go())
    finally:
        svc.store.shutdown()
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details == "tenant: at most 256 characters"
