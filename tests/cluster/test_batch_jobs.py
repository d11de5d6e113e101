"""Batch jobs on a real router and workers: submit, progress, results (exactly once, in index order), cancel,
API keys, and a router killed with SIGKILL mid-job that resumes from its SQLite database on restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time

import grpc
import pytest

from pdserve.bench.batch_client import BatchClient
from pdserve.deploy.local import LocalCluster, _await_ready, kill_group, respawn
from pdserve.protos import pdserve_pb2 as pb

S = pb.SamplingParams
KEYS = {"key-alice": "alice", "key-bob": "bob"}


def requests(n: int, max_tokens: int = 6, offset: int = 0) -> list[pb.GenerateRequest]:
    return [pb.GenerateRequest(token_ids=[10 + (7 * (i + offset)) % 150 + j for j in range(12)],
                               sampling=S(max_tokens=max_tokens, temperature=0, ignore_eos=True)) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def batch_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    (tmp / "keys.json").write_text(json.dumps(KEYS))
    args = ["--api-keys", str(tmp / "keys.json"), "--batch-db", str(tmp / "jobs.sqlite3"), "--batch-concurrency", "4"]
    with LocalCluster(1, 1, router_args=args) as c:
        yield c


def test_submit_progress_results_in_order_and_errors_as_results(batch_cluster):
    addr = batch_cluster.router_address
    reqs = requests(10)
    reqs[3] = pb.GenerateRequest(token_ids=[10**6], sampling=S(max_tokens=4))  # outside the vocabulary

    async def go():
        async with BatchClient(addr, "key-alice") as client:
            job_id = await client.submit(reqs)
            seen = []
            job = await client.wait(job_id, timeout_s=120, on_poll=lambda j: seen.append(j.num_pending))
            return job_id, job, seen, await client.results(job_id), await client.results(job_id, start_index=7)

    job_id, job, seen, results, tail = run(go())
    assert job.status == "completed" and (job.num_requests, job.num_succeeded, job.num_failed) == (10, 9, 1)
    assert job.num_pending == 0 and job.finished_at >= job.created_at > 0
    assert seen == sorted(seen, reverse=True), "progress only moves forward"
    assert [r.index for r in results] == list(range(10)) and [r.index for r in tail] == [7, 8, 9]
    assert results[3].error_code == "INVALID_ARGUMENT" and not results[3].HasField("response")
    assert results[0].request_id == f"{job_id}-0"
    for r in results:
        if r.index != 3:
            assert r.response.finish_reason == "length" and len(r.response.token_ids) == 6


def test_batch_answers_equal_interactive_ones_and_jobs_belong_to_their_tenant(batch_cluster):
    addr = batch_cluster.router_address
    reqs = requests(4, offset=50)

    async def go():
        async with BatchClient(addr, "key-alice") as alice, BatchClient(addr, "key-bob") as bob, \
                BatchClient(addr) as nobody:
            job_id = await alice.submit(reqs)
            await alice.wait(job_id, timeout_s=120)
            with pytest.raises(grpc.aio.AioRpcError) as not_bobs:
                await bob.get(job_id)
            with pytest.raises(grpc.aio.AioRpcError) as no_key:
                await nobody.get(job_id)
            foreign = pb.GenerateRequest(tenant="bob", prompt="hi")
            with pytest.raises(grpc.aio.AioRpcError) as other_tenant:
                await alice.submit([foreign])
            return await alice.results(job_id), not_bobs.value, no_key.value, other_tenant.value

    results, not_bobs, no_key, other_tenant = run(go())
    assert not_bobs.code() == grpc.StatusCode.NOT_FOUND
    assert no_key.code() == grpc.StatusCode.UNAUTHENTICATED
    assert other_tenant.code() == grpc.StatusCode.PERMISSION_DENIED

    async def interactive():
        async with grpc.aio.insecure_channel(addr) as ch:
            from pdserve.protos import pdserve_pb2_grpc as pb_grpc

            stub = pb_grpc.GenerationStub(ch)
            md = (("authorization", "Bearer key-alice"),)
            return [await stub.Complete(r, metadata=md, timeout=60) for r in reqs]

    assert [list(r.response.token_ids) for r in results] == [list(r.token_ids) for r in run(interactive())]


def test_cancel_stops_the_job_and_keeps_its_stored_results(batch_cluster):
    addr = batch_cluster.router_address

    async def go():
        async with BatchClient(addr, "key-alice") as client:
            job_id = await client.submit(requests(40, max_tokens=48, offset=100))
            deadline = time.monotonic() + 120
            while (await client.get(job_id)).num_succeeded < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            cancelled = await client.cancel(job_id)
            again = await client.cancel(job_id)
            stored = await client.results(job_id)
            followed = await client.results(job_id, follow=True, timeout_s=20)
            return cancelled, again, stored, followed

    cancelled, again, stored, followed = run(go())
    assert cancelled.status == "cancelled" and cancelled.num_pending == 0 and cancelled.finished_at > 0
    assert 2 <= cancelled.num_succeeded < 40 and again.num_succeeded == cancelled.num_succeeded
    assert len(stored) == cancelled.num_succeeded + cancelled.num_failed
    assert [r.index for r in followed] == [r.index for r in stored], "follow ends once the job has ended"


def test_a_job_survives_a_sigkill_of_the_router_and_every_result_arrives_once(tmp_path):
    n = 48
    args = ["--batch-db", str(tmp_path / "jobs.sqlite3"), "--batch-concurrency", "4"]
    with LocalCluster(1, 1, router_args=args) as c:
        router = next(p for p in c.procs if p.role == "router")

        async def submit_and_kill():
            async with BatchClient(c.router_address) as client:
                job_id = await client.submit(requests(n, max_tokens=16, offset=200))
                first, deadline = [], time.monotonic() + 120
                while len(first) < 8 and time.monotonic() < deadline:  # read part of the results, then kill -9
                    stored = await client.results(job_id)
                    first = [r for i, r in itertools.takewhile(lambda p: p[0] == p[1].index, enumerate(stored))]
                    await asyncio.sleep(0.05)
                return job_id, first

        job_id, first = run(submit_and_kill())
        assert 8 <= len(first) < n, "killed mid-job"
        kill_group(router, signal.SIGKILL)
        router.popen.wait(10)
        respawn(router, c.env, c.echo)
        _await_ready(router, 120)

        async def finish():
            async with BatchClient(c.router_address) as client:
                job = await client.wait(job_id, timeout_s=180)
                rest = await client.results(job_id, start_index=first[-1].index + 1, follow=True, timeout_s=60)
                return job, rest, await client.results(job_id)

        job, rest, everything = run(finish())
    assert job.status == "completed" and job.num_succeeded == n and job.num_failed == 0
    received = [r.index for r in first] + [r.index for r in rest]
    assert received == list(range(n)), "resumed from the last index: no duplicate, none lost"
    assert [r.index for r in everything] == list(range(n)), "one stored result per index"
    assert all(len(r.response.token_ids) == 16 for r in everything)
