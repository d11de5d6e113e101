"""Bad input on the public API, cancel freeing blocks on both workers, Complete, Admin, health."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from tests.cluster.conftest import direct_load, generate

S = pb.SamplingParams

BAD = {
    "empty prompt": (pb.GenerateRequest(prompt=""), "prompt"),
    "neither prompt nor token_ids": (pb.GenerateRequest(sampling=S(max_tokens=4)), "prompt"),
    "both prompt and token_ids": (pb.GenerateRequest(prompt="hi", token_ids=[5, 6]), "prompt"),
    "token id outside vocab": (pb.GenerateRequest(token_ids=[5, 100000]), "token_ids"),
    "negative token id": (pb.GenerateRequest(token_ids=[-1]), "token_ids"),
    "prompt over context": (pb.GenerateRequest(token_ids=[7] * 5000), "prompt"),
    "max_tokens zero": (pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=0)), "max_tokens"),
    "max_tokens negative": (pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=-3)), "max_tokens"),
    "temperature nan": (pb.GenerateRequest(prompt="hi", sampling=S(temperature=math.nan)), "temperature"),
    "temperature negative": (pb.GenerateRequest(prompt="hi", sampling=S(temperature=-0.5)), "temperature"),
    "top_p zero": (pb.GenerateRequest(prompt="hi", sampling=S(top_p=0.0)), "top_p"),
    "top_p above one": (pb.GenerateRequest(prompt="hi", sampling=S(top_p=1.5)), "top_p"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_invalid_argument(cluster_1p1d, case):
    req, field = BAD[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        generate(cluster_1p1d.router_address, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()
    # the cluster keeps serving
    ok = generate(cluster_1p1d.router_address, pb.GenerateRequest(prompt="still serving", sampling=S(max_tokens=3)))
    assert ok[-1].finish_reason in ("stop", "length")


def _free(cluster, role):
    return [direct_load(p.address, role) for p in cluster.workers(role)]


def test_cancel_frees_blocks_on_both_workers(cluster_1p1d):
    c = cluster_1p1d

    async def go():
        async with grpc.aio.insecure_channel(c.router_address) as ch:
            call = pb_grpc.GenerationStub(ch).Generate(
                pb.GenerateRequest(token_ids=list(range(3, 203)), sampling=S(max_tokens=1500, ignore_eos=True)),
                timeout=60,
            )
            got = 0
            async for resp in call:
                got += len(resp.token_ids)
                if got >= 3:
                    break
            busy = (await asyncio.to_thread(_free, c, "decode"))[0]
            call.cancel()
            return busy

    busy = asyncio.run(go())
    assert busy.num_running == 1 and busy.num_free_blocks < busy.num_total_blocks
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        d, p = _free(c, "decode")[0], _free(c, "prefill")[0]
        if d.num_free_blocks == d.num_total_blocks and p.num_free_blocks == p.num_total_blocks and not d.num_running:
            break
        time.sleep(0.05)
    assert d.num_running == 0 and d.num_reserved == 0
    assert d.num_free_blocks == d.num_total_blocks, "decode blocks not freed after cancel"
    assert p.num_free_blocks == p.num_total_blocks, "prefill blocks not freed after cancel"
    assert d.num_aborted >= 1


def test_deadline_frees_blocks(cluster_1p1d):
    c = cluster_1p1d
    with pytest.raises(grpc.aio.AioRpcError) as err:
        generate(c.router_address, pb.GenerateRequest(token_ids=[9] * 50, sampling=S(max_tokens=1900, ignore_eos=True)),
                 timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        d = _free(c, "decode")[0]
        if d.num_free_blocks == d.num_total_blocks and not d.num_running:
            break
        time.sleep(0.05)
    assert d.num_free_blocks == d.num_total_blocks and d.num_running == 0


def test_complete_and_stream_agree(cluster_1p1d):
    c = cluster_1p1d
    req = pb.GenerateRequest(prompt="The quick brown fox", sampling=S(max_tokens=10, temperature=0))

    async def go():
        async with grpc.aio.insecure_channel(c.router_address) as ch:
            return await pb_grpc.GenerationStub(ch).Complete(req, timeout=30)

    whole = asyncio.run(go())
    parts = generate(c.router_address, req)
    assert list(whole.token_ids) == [t for p in parts for t in p.token_ids]
    assert whole.text == "".join(p.text for p in parts)
    assert whole.finish_reason == parts[-1].finish_reason
    assert whole.usage.completion_tokens == len(whole.token_ids)
    assert whole.prefill_worker and whole.decode_worker
    assert whole.timings.first_token_s > 0 and whole.timings.total_s >= whole.timings.first_token_s


def test_request_id_and_seeded_sampling(cluster_1p1d):
    c = cluster_1p1d
    req = pb.GenerateRequest(request_id="my-id-1", prompt="seeded", sampling=S(max_tokens=8, temperature=1.0, seed=7))
    a = generate(c.router_address, req)
    req.request_id = "my-id-2"
    b = generate(c.router_address, req)
    assert a[0].request_id == "my-id-1"
    assert [t for r in a for t in r.token_ids] == [t for r in b for t in r.token_ids]


def test_admin_and_health(cluster_1p1d):
    c = cluster_1p1d

    async def go():
        async with grpc.aio.insecure_channel(c.router_address) as ch:
            admin = pb_grpc.AdminStub(ch)
            workers = (await admin.ListWorkers(pb.ListWorkersRequest(), timeout=10)).workers
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=10
            )
            decode = next(w for w in workers if w.role == "decode")
            drained = await admin.Drain(pb.DrainRequest(address=decode.address), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.GenerationStub(ch).Complete(pb.GenerateRequest(prompt="x"), timeout=10)
            undrained = await admin.Undrain(pb.DrainRequest(address=decode.address), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await admin.Drain(pb.DrainRequest(address="nowhere:1"), timeout=10)
            return workers, health, drained, err.value, undrained, missing.value

    workers, health, drained, err, undrained, missing = asyncio.run(go())
    assert sorted(w.role for w in workers) == ["decode", "prefill"]
    assert all(w.healthy and w.load.num_total_blocks > 0 for w in workers)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert drained.worker.draining and not undrained.worker.draining
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert missing.code() == grpc.StatusCode.NOT_FOUND
