"""Fixtures that start real clusters (separate processes on 127.0.0.1, port 0) and a gRPC client.

The clusters of these tests share one cluster secret (set here, before any starts), so that the tests can call
the workers directly with a cluster credential (``worker_channel``) as the router does."""

from __future__ import annotations

import asyncio
import os
import secrets

import grpc
import pytest

from pdserve.deploy.local import LocalCluster
from pdserve.engine import env
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import worker_channel as _worker_channel

os.environ.setdefault(env.CLUSTER_SECRET, f"pdserve-tests-{secrets.token_hex(16)}")


def worker_channel(address: str) -> grpc.aio.Channel:
    """A channel to a worker whose every call carries a token of the tests' cluster secret."""
    return _worker_channel(address, env.cluster_secret(), "tests")


def generate(address: str, req: pb.GenerateRequest, timeout: float = 60.0) -> list[pb.GenerateResponse]:
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            return [r async for r in pb_grpc.GenerationStub(ch).Generate(req, timeout=timeout)]

    return asyncio.run(go())


def generate_many(address: str, reqs: list[pb.GenerateRequest], timeout: float = 120.0):
    """Send all requests concurrently; returns a list of response lists (or the AioRpcError)."""

    async def one(stub, req):
        try:
            return [r async for r in stub.Generate(req, timeout=timeout)]
        except grpc.aio.AioRpcError as e:
            return e

    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            return await asyncio.gather(*(one(stub, r) for r in reqs))

    return asyncio.run(go())


def worker_loads(address: str) -> list[pb.WorkerStatus]:
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            return list((await pb_grpc.AdminStub(ch).ListWorkers(pb.ListWorkersRequest(), timeout=10)).workers)

    return asyncio.run(go())


def direct_load(address: str, role: str) -> pb.WorkerLoad:
    async def go():
        async with worker_channel(address) as ch:
            stub = pb_grpc.PrefillStub(ch) if role == "prefill" else pb_grpc.DecodeStub(ch)
            return await stub.GetLoad(pb.LoadRequest(), timeout=10)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def cluster_1p1d():
    with LocalCluster(1, 1, transfer="tcp") as c:
        yield c
