"""Cluster-level KV cut: prefill workers cut every 2nd KV connection mid-frame (``--debug-kv-cut-every 2``);
the transfers are re-sent, not failed back to the router (bench/chaos.py's cut row, CI size)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.bench.chaos import leak_check, metric_total
from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

NUM_REQUESTS = 8


async def _generate_all(address: str) -> list[list[int]]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)

        async def one(i: int) -> list[int]:
            req = pb.GenerateRequest(token_ids=[3 + (i * 7 + j) % 200 for j in range(40 + 9 * i)],
                                     sampling=pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            return [t async for r in stub.Generate(req, timeout=60) for t in r.token_ids]

        return await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))


@pytest.mark.timeout(240)
def test_cut_kv_connections_are_re_sent_not_retried_by_the_router():
    workers = ["--debug-kv-cut-every", "2", "--metrics-port", "-1"]
    with LocalCluster(1, 1, extra_worker_args=workers,
                      router_args=["--local-prefill-tokens", "0", "--metrics-port", "-1"]) as c:
        outs = asyncio.run(_generate_all(c.router_address))
        assert all(len(o) == 4 for o in outs)
        (prefill,) = c.workers("prefill")
        (router,) = c.workers("router")
        assert metric_total(prefill.metrics_port, "pdserve_kv_transfer_resends_total") >= NUM_REQUESTS // 2 // 2
        assert metric_total(prefill.metrics_port, "pdserve_kv_transfer_failures_total") == 0
        assert metric_total(router.metrics_port, "pdserve_router_retries_total") == 0
        leaked, errors = leak_check(c)
        assert leaked == 0 and errors == []
