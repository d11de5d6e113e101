"""Units of the cluster plane's defences: the cluster token, request ownership on a decode worker, the engine
loop's abort path, parsing limits off the event loop, the admission bound on fresh load."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from pdserve.engine.errors import InvalidRequestError, UnauthenticatedError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.admission import Admission, AdmissionError, admission_bound
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Worker
from pdserve.router.offload import Offload
from pdserve.router.policy import PairPolicy, RouteRequest, fresh_waiting
from pdserve.router.request import RequestParser, encode_bounded
from pdserve.serving.cluster_auth import ClusterCredential, binding_of, method_name
from pdserve.serving.rpc import channel, heartbeat
from tests.prefill.helpers import greedy, run, running

DECODE = method_name("Decode", "Decode")


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- the token ----------------------------------------------------------------------------------------
def test_a_token_is_good_for_its_method_request_and_lifetime_only():
    clock = Clock()
    router = ClusterCredential("s3cret", "router-1", clock=clock)
    worker = ClusterCredential("s3cret", "decode-1", clock=clock)
    tok = router.token(DECODE, "r1")
    assert worker.verify(tok, DECODE, "r1") == "router-1"
    for bad_method, bad_binding in ((method_name("Decode", "Release"), "r1"), (DECODE, "r2")):
        with pytest.raises(UnauthenticatedError, match="bad MAC"):
            worker.verify(tok, bad_method, bad_binding)
    with pytest.raises(UnauthenticatedError, match="bad MAC"):
        ClusterCredential("other", "decode-1", clock=clock).verify(tok, DECODE, "r1")
    v, principal, expiry, mac = tok.split(".")
    for forged in (f"{v}.admin.{expiry}.{mac}", f"{v}.{principal}.{int(expiry) + 60_000}.{mac}"):
        with pytest.raises(UnauthenticatedError, match="bad MAC"):
            worker.verify(forged, DECODE, "r1")
    for junk in ("", "v1.a.b", "v2.router-1.1.x", "v1.bad principal!.1.x", "v1.r.12a.x", "x" * 300):
        with pytest.raises(UnauthenticatedError):
            worker.verify(junk, DECODE, "r1")
    clock.t += 31
    with pytest.raises(UnauthenticatedError, match="expired"):
        worker.verify(tok, DECODE, "r1")
    ahead = ClusterCredential("s3cret", "router-1", ttl_s=300, clock=clock).token(DECODE, "r1")
    with pytest.raises(UnauthenticatedError, match="too far ahead"):
        worker.verify(ahead, DECODE, "r1")


def test_credential_arguments_and_bindings():
    with pytest.raises(ValueError, match="secret"):
        ClusterCredential("", "x")
    with pytest.raises(ValueError, match="principal"):
        ClusterCredential("s", "has space")
    assert binding_of(pb.DecodeRequest(request_id="a")) == "a"
    assert binding_of(pb.RegisterRequest(address="h:1")) == "h:1"
    assert binding_of(pb.DrainRequest(address="h:1")) == "" and binding_of(pb.LoadRequest()) == ""


# ---- a decode worker: the interceptor, ownership, every abort ends with a status -----------------------
def test_ownership_on_a_decode_worker_and_heartbeats_carry_the_credential(caplog):
    prompt = [(5 * i + 7) % 200 + 10 for i in range(40)]

    async def go():
        async with running("decode", cluster_secret="s3", step_delay_s=0.02) as d:
            a = channel(d.address, credential=ClusterCredential("s3", "owner"))
            b = channel(d.address, credential=ClusterCredential("s3", "other"))
            stub_a, stub_b = pb_grpc.DecodeStub(a), pb_grpc.DecodeStub(b)
            first = stub_a.Decode(pb.DecodeRequest(request_id="r", token_ids=prompt, sampling=greedy(40)), timeout=30)
            await first.read()
            dup = stub_b.Decode(pb.DecodeRequest(request_id="r", token_ids=prompt, sampling=greedy(2)), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as dup_err:
                await dup.read()
            with pytest.raises(grpc.aio.AioRpcError) as release_err:
                await stub_b.Release(pb.ReleaseRequest(request_id="r"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as reserve_err:  # an id in use cannot be reserved either
                await stub_b.Reserve(pb.ReserveRequest(request_id="r", token_ids=prompt, sampling=greedy(2)), timeout=10)
            rest = [c async for c in first]
            # a reservation is its maker's: another principal can neither Decode into it nor Release it
            await stub_a.Reserve(pb.ReserveRequest(request_id="res", token_ids=prompt, sampling=greedy(2)), timeout=10)
            steal = stub_b.Decode(pb.DecodeRequest(request_id="res", token_ids=prompt, sampling=greedy(2),
                                                   prefilled=True), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as steal_err:
                await steal.read()
            released = await stub_a.Release(pb.ReleaseRequest(request_id="res"), timeout=10)
            load = await stub_a.GetLoad(pb.LoadRequest(check_integrity=True), timeout=10)
            await a.close()
            await b.close()
            return dup_err.value, release_err.value, reserve_err.value, rest, steal_err.value, released, load

    dup, release, reserve, rest, steal, released, load = run(go())
    assert dup.code() == grpc.StatusCode.INVALID_ARGUMENT and "in use" in dup.details()
    assert release.code() == grpc.StatusCode.NOT_FOUND
    assert reserve.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rest[-1].finish_reason == "length" and sum(len(c.token_ids) for c in rest) == 39
    assert steal.code() == grpc.StatusCode.NOT_FOUND and released.released
    assert (load.integrity_error, load.num_live_blocks, load.num_reserved) == ("", 0, 0)


class Registry(pb_grpc.AdminServicer):
    def __init__(self, credential: ClusterCredential | None):
        self.credential, self.seen = credential, []

    async def Register(self, request, context):
        token = dict(context.invocation_metadata()).get("pdserve-cluster-token")
        try:
            self.seen.append(self.credential.verify(token, method_name("Admin", "Register"), request.address))
        except UnauthenticatedError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid cluster credential")
        return pb.RegisterResponse(accepted=True)


def test_a_heartbeat_carries_the_credential_and_a_refused_one_is_a_warning(caplog):
    async def go(router_secret: str):
        registry = Registry(ClusterCredential(router_secret, "router-x"))
        server = grpc.aio.server()
        pb_grpc.add_AdminServicer_to_server(registry, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        task = asyncio.create_task(heartbeat([f"127.0.0.1:{port}"], "127.0.0.1:9", "decode", stop, interval_s=0.05,
                                             credential=ClusterCredential("s3", "decode-1")))
        await asyncio.sleep(0.3)
        stop.set()
        await task
        await server.stop(None)
        return registry.seen

    with caplog.at_level(logging.WARNING, logger="pdserve.serving.rpc"):
        assert run(go("s3"), timeout=30)[:1] == ["decode-1"]
        assert not caplog.records
        assert run(go("another"), timeout=30) == []
    refusals = [r for r in caplog.records if "refused this worker's registration" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING, "once, not once a heartbeat"


# ---- parsing: limits, off the loop ---------------------------------------------------------------------
class CountingTok:
    def __init__(self):
        self.chars = 0

    def encode(self, text, add_special_tokens=True):
        self.chars += len(text)
        return [ord(c) % 256 for c in text]


def test_a_long_prompt_is_refused_after_a_piece_not_tokenized_whole():
    tok = CountingTok()
    with pytest.raises(InvalidRequestError, match="prompt: more than 2047 tokens"):
        encode_bounded(tok, "word " * 800_000, 2048)
    assert tok.chars < 100_000, "only the first piece was tokenized"
    assert encode_bounded(tok, "ab cd", 2048) == tuple(ord(c) for c in "ab cd")
    with pytest.raises(InvalidRequestError, match="prompt: 5 tokens exceeds the context limit of 4"):
        encode_bounded(tok, "ab cd", 5)


def test_parse_async_runs_large_prompts_on_threads_and_bounds_only_the_huge_lane():
    async def go():
        parser = RequestParser(CountingTok(), seed=0, offload=Offload(max_workers=1, max_waiting=1))
        small = await parser.parse_async(pb.GenerateRequest(prompt="hi"))
        long = pb.GenerateRequest(prompt="x " * 10_000)  # 20 kB: on a thread, never refused
        huge = pb.GenerateRequest(prompt="x " * 200_000)  # 400 kB: the bounded lane
        longs = await asyncio.gather(*(parser.parse_async(long) for _ in range(5)))
        huges = await asyncio.gather(*(parser.parse_async(huge) for _ in range(3)), return_exceptions=True)
        return small, longs, huges, parser.offload.num_refused

    small, longs, huges, num_refused = run(go(), timeout=60)
    assert small.token_ids == (104, 105) and all(len(r.token_ids) == 20_000 for r in longs)
    assert sum(isinstance(r, AdmissionError) for r in huges) == 1 and num_refused == 1
    assert all(len(r.token_ids) == 400_000 for r in huges if not isinstance(r, Exception))


# ---- admission on fresh load -----------------------------------------------------------------------------
def _worker(addr: str, **load) -> Worker:
    return Worker(addr, "decode", None, None, load=WorkerLoad(**load), healthy=True)


def test_the_admission_bound_comes_from_max_num_seqs_and_kv_and_counts_fresh_load():
    assert admission_bound(WorkerLoad(), 3) == 0, "no bound until the worker reports max_num_seqs"
    assert admission_bound(WorkerLoad(max_num_seqs=64, num_total_blocks=10_000), 3) == 128
    assert admission_bound(WorkerLoad(max_num_seqs=64, num_total_blocks=100), 10) == 20, "KV holds 10 at once"
    adm = Admission()
    w = _worker("d:1", max_num_seqs=2, num_total_blocks=1000, num_running=2, num_waiting=2)
    with pytest.raises(AdmissionError, match="admission bound") as err:
        adm.with_room([w], 3)
    assert err.value.retry_after_s > 0
    # the poll saw this router's 4 requests; all 4 have ended since: the worker is idle now, before any poll
    w.in_flight_at_poll, w.in_flight = 4, 0
    assert adm.with_room([w], 3) == [w]
    busy = _worker("d:2", max_num_seqs=2, num_total_blocks=1000)
    busy.in_flight = 4  # sent since the last poll: counted at once
    assert adm.with_room([busy, w], 3) == [w]
    assert Admission(capacity_bound=False).with_room([busy], 3) == [busy]


def test_slo_shedding_reads_fresh_load_so_an_idle_cluster_is_never_refused():
    stale = dict(max_num_seqs=64, num_total_blocks=1000, num_free_blocks=1000, num_waiting=900, step_s=0.01,
                 num_queued_tokens=400_000)
    d = _worker("d:1", **stale)
    p = Worker("p:1", "prefill", None, None, load=WorkerLoad(**stale), healthy=True)
    policy = PairPolicy("cache_aware")
    adm = Admission(shed_ttft_s=0.5)
    route = RouteRequest(20, [])
    d.in_flight_at_poll = p.in_flight_at_poll = d.in_flight = p.in_flight = 1000  # a burst, all this router's
    with pytest.raises(AdmissionError):
        adm.check_slo(policy.choose(route, [p], [d]).predicted_ttft_s, 0)
    d.in_flight = p.in_flight = 0  # the burst has ended; the next poll is up to 0.5 s away
    assert fresh_waiting(d) == 0 and policy.queued_tokens(p) == 0
    adm.check_slo(policy.choose(route, [p], [d]).predicted_ttft_s, 0)


def test_an_abort_ends_the_stream_and_a_refused_duplicate_keeps_the_first_listener(tiny_engine_loop):
    loop = tiny_engine_loop
    prompt = [(3 * i + 1) % 200 + 10 for i in range(20)]
    from pdserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def go():
        first = loop.stream("a", lambda e: e.add_request("a", prompt, params))
        got = [await anext(first)]
        with pytest.raises(InvalidRequestError):
            async for _ in loop.stream("a", lambda e: e.add_request("a", prompt, params)):
                pass
        got.append(await asyncio.wait_for(anext(first), 10))  # still fed
        loop.abort("a")
        t0 = time.monotonic()
        with pytest.raises(Exception) as ended:
            while True:
                await asyncio.wait_for(anext(first), 10)
        return got, ended.value, time.monotonic() - t0

    got, ended, ended_s = run(go(), timeout=60)
    assert len(got) == 2 and type(ended).__name__ == "CancelledError" and ended_s < 5


@pytest.fixture
def tiny_engine_loop():
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.engine_loop import EngineLoop
    from tests.prefill.helpers import ENGINE

    loop = EngineLoop(LLMEngine(ENGINE), step_delay_s=0.01).start()
    yield loop
    loop.stop()
