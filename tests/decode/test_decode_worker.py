"""A real decode worker in this process: drain, reservations, errors of the prefill leg, the worker base."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pdserve.engine.errors import CapacityError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.worker import WorkerServicer, advertise, drain
from tests.prefill.helpers import ENGINE, greedy, run, running

PROMPT = [(7 * i + 3) % 300 + 10 for i in range(40)]  # needs 3 blocks of 16


async def until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02):
    """Poll an async predicate until it holds; fail the test if it never does within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(interval_s)


async def load(stub: pb_grpc.DecodeStub) -> pb.WorkerLoad:
    return await stub.GetLoad(pb.LoadRequest(check_integrity=True), timeout=10)


def reserve_request(rid: str, **kw) -> pb.ReserveRequest:
    return pb.ReserveRequest(request_id=rid, token_ids=PROMPT, sampling=greedy(4), **kw)


def test_drain_finishes_in_flight_work_and_refuses_new_work():
    num_tokens = 40

    async def go():
        async with running("decode", step_delay_s=0.05, grace_s=60.0) as d:
            stub = pb_grpc.DecodeStub(d.channel)
            req = pb.DecodeRequest(request_id="long", token_ids=PROMPT, sampling=greedy(num_tokens))
            stream = stub.Decode(req, timeout=60)
            first = await stream.read()  # in flight now
            d.stop.set()  # what SIGTERM does
            await until(lambda: _not_serving(d))
            during = await load(stub)
            with pytest.raises(grpc.aio.AioRpcError) as refused_reserve:
                await stub.Reserve(reserve_request("late"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused_decode:
                late = pb.DecodeRequest(request_id="late2", token_ids=PROMPT, sampling=greedy(2))
                await anext(aiter(stub.Decode(late, timeout=10)))
            rest = []
            while (chunk := await stream.read()) is not grpc.aio.EOF:
                rest.append(chunk)
            await asyncio.wait_for(d.task, 30)  # the worker stops by itself once the stream is done
            return first, rest, during, refused_reserve.value, refused_decode.value

    first, rest, during, refused_reserve, refused_decode = run(go())
    assert len([t for c in [first, *rest] for t in c.token_ids]) == num_tokens
    assert rest[-1].finish_reason == "length"
    assert during.draining and during.integrity_error == ""
    for err in (refused_reserve, refused_decode):
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "draining" in err.details()


async def _not_serving(worker) -> bool:
    return await worker.health() == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reservation_without_decode_expires_and_frees_its_blocks():
    async def go():
        async with running("decode") as d:
            stub = pb_grpc.DecodeStub(d.channel)
            resp = await stub.Reserve(reserve_request("orphan", ttl_s=0.2), timeout=10)
            held = await load(stub)
            freed = await until(lambda: _freed(stub))
            return resp, held, freed

    resp, held, freed = run(go())
    assert len(resp.block_ids) == 3 and resp.transfer_id == "orphan" and resp.kv_endpoint.startswith("tcp://")
    assert (held.num_reserved, held.num_free_blocks, held.num_live_blocks) == (1, ENGINE.num_blocks - 3, 3)
    assert (freed.integrity_error, freed.num_live_blocks, freed.num_aborted) == ("", 0, 1)


async def _freed(stub):
    current = await load(stub)
    return current if current.num_reserved == 0 else None


def test_release_frees_once_and_a_foreign_layout_is_refused():
    async def go():
        async with running("decode") as d:
            stub = pb_grpc.DecodeStub(d.channel)
            ours = (await load(stub)).fingerprint
            await stub.Reserve(reserve_request("r", fingerprint=ours), timeout=10)
            first = await stub.Release(pb.ReleaseRequest(request_id="r"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as second:  # gone: as unknown as another caller's
                await stub.Release(pb.ReleaseRequest(request_id="r"), timeout=10)
            theirs = pb.LayoutFingerprint()
            theirs.CopyFrom(ours)
            theirs.block_size = 32
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Reserve(reserve_request("other", fingerprint=theirs), timeout=10)
            return first, second.value, refused.value, await load(stub)

    first, second, refused, after = run(go())
    assert first.released and second.code() == grpc.StatusCode.NOT_FOUND
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "block_size: 32 != 16" in refused.details()
    assert (after.integrity_error, after.num_live_blocks, after.num_reserved) == ("", 0, 0)


def test_a_dead_prefill_worker_is_blamed_and_the_reservation_freed():
    async def go():
        async with running("decode") as d:
            stub = pb_grpc.DecodeStub(d.channel)
            req = pb.DecodeRequest(request_id="x", token_ids=PROMPT, sampling=greedy(2),
                                   prefill_address="127.0.0.1:1")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await anext(aiter(stub.Decode(req, timeout=30)))
            return failed.value, await load(stub)

    failed, after = run(go())
    assert failed.code() == grpc.StatusCode.UNAVAILABLE and "127.0.0.1:1" in failed.details()
    assert ("pdserve-failed-role", "prefill") in tuple(failed.trailing_metadata())
    assert (after.integrity_error, after.num_live_blocks, after.num_reserved) == ("", 0, 0)


# ---- the worker base on its own ---------------------------------------------------------------------
class Idle(WorkerServicer):
    service = "Decode"

    def __init__(self):  # no engine: drain and refusal need only the counters
        self.draining, self.in_flight, self.num_aborted = False, 0, 0


def test_drain_waits_for_in_flight_work_within_the_grace():
    async def go():
        busy, finishing = Idle(), Idle()
        busy.in_flight = finishing.in_flight = 1
        asyncio.get_running_loop().call_later(0.1, lambda: setattr(finishing, "in_flight", 0))
        return await drain(busy, grace_s=0.3, interval_s=0.01), await drain(finishing, grace_s=30, interval_s=0.01), busy

    gave_up, finished, busy = run(go(), timeout=20)
    assert (gave_up, finished) == (False, True)
    assert busy.draining
    with pytest.raises(CapacityError, match="draining"):
        busy.refuse_if_draining()


def test_advertise_replaces_only_wildcard_hosts():
    assert advertise("tcp://0.0.0.0:5000", "10.0.0.7") == "tcp://10.0.0.7:5000"
    assert advertise("tcp://[::]:5000", "node-a") == "tcp://node-a:5000"
    assert advertise("tcp://127.0.0.1:5000", "10.0.0.7") == "tcp://127.0.0.1:5000"
    assert advertise("tcp://0.0.0.0:5000", "") == "tcp://0.0.0.0:5000"


def test_worker_options_reject_unknown_flags():
    from pdserve.decode.server import serve

    with pytest.raises(TypeError, match="no_such_flag"):
        run(serve(dataclasses.replace(ENGINE), None, no_such_flag=1), timeout=10)


class Registry(pb_grpc.AdminServicer):
    """A router's Admin.Register, recording what workers say."""

    def __init__(self):
        self.requests: list[pb.RegisterRequest] = []
        self.first = asyncio.Event()

    async def Register(self, request, context):
        self.requests.append(request)
        self.first.set()
        return pb.RegisterResponse(accepted=True)


def test_worker_registers_with_routers_and_says_goodbye_before_draining():
    async def go():
        registry = Registry()
        router = grpc.aio.server()
        pb_grpc.add_AdminServicer_to_server(registry, router)
        port = router.add_insecure_port("127.0.0.1:0")
        await router.start()
        try:
            async with running("decode", routers=(f"127.0.0.1:{port}",)) as d:
                await asyncio.wait_for(registry.first.wait(), 20)
                await d.stopped()
                return d.address, registry.requests
        finally:
            await router.stop(None)

    address, requests = run(go())
    assert {(r.address, r.role) for r in requests} == {(address, "decode")}
    assert [r.leaving for r in requests] == [False] * (len(requests) - 1) + [True], "goodbye last, once"
    assert requests[0].ttl_s > 0


def test_a_reservation_names_its_adapter_and_an_unknown_one_holds_nothing():
    async def go():
        async with running("decode") as d:
            stub = pb_grpc.DecodeStub(d.channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Reserve(reserve_request("ad", lora_name="no-such-adapter"), timeout=10)
            return refused.value, await load(stub)

    refused, after = run(go())
    assert refused.code() == grpc.StatusCode.NOT_FOUND, refused
    assert "no-such-adapter" in refused.details(), refused.details()
    assert (after.integrity_error, after.num_live_blocks, after.num_reserved) == ("", 0, 0)
