"""Many models through the router's servicers, without processes: pools per base model, adapters on the decode
request and in the prefix hashes, the response's model, and Admin.LoadAdapter/UnloadAdapter fan-out."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from pdserve.engine.errors import InvalidRequestError, RequestNotFoundError
from pdserve.engine.hashing import adapter_extra, block_hashes
from pdserve.engine.layout import LayoutFingerprint
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.adapters import AdapterAdmin
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Membership, Worker
from pdserve.router.models import BaseModel, ModelCatalog, Target
from pdserve.router.policy import PairPolicy
from pdserve.router.prefix_index import BlockEvents, PrefixIndex
from pdserve.router.request import RequestParser
from pdserve.router.routes import parse_route
from pdserve.router.service import GenerationServicer
from pdserve.router.token_text import TokenTexts
from pdserve.serving.errors import RpcStatusError
from tests.router.test_router_overhead_units import FakeCall

FP = {m: LayoutFingerprint(model_id=m, revision="main", num_layers=4, num_kv_heads=2, head_dim=32, block_size=4,
                           dtype="float32", hash_seed=0) for m in ("tiny", "tiny-qwen2")}


class Stub:
    """A worker stub: Decode answers one chunk; LoadAdapter/UnloadAdapter record calls (or fail)."""

    def __init__(self, worker_id: str, fail_load: bool = False):
        self.worker_id, self.fail_load = worker_id, fail_load
        self.decodes, self.calls, self.requests = [], [], []

    def Decode(self, request, timeout=None, metadata=None):
        self.decodes.append(request)
        return FakeCall([pb.DecodeChunk(token_ids=[5], text="x", finish_reason="length")])

    async def LoadAdapter(self, request, timeout=None, metadata=None):
        self.calls.append(("load", request.name, request.path))
        self.requests.append(request)
        if self.fail_load:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, None, None, "path: no adapter_config.json")
        return pb.LoadAdapterResponse(worker_ids=[self.worker_id])

    async def UnloadAdapter(self, request, timeout=None, metadata=None):
        self.calls.append(("unload", request.name))
        self.requests.append(request)
        return pb.UnloadAdapterResponse(unloaded=True, worker_ids=[self.worker_id])

    async def GetLoad(self, request, timeout=None, metadata=None):
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "fake")


def _worker(addr, role, model, adapters=(), resident=None, fail_load=False):
    load = WorkerLoad(address=addr, role=role, worker_id=f"{role}-{addr}", served_model=model, fingerprint=FP[model],
                      vocab_size=1000, max_model_len=4096, num_total_blocks=100, num_free_blocks=100, host="h",
                      device="cpu", adapters=tuple(adapters),
                      resident_adapters=tuple(adapters if resident is None else resident))
    return Worker(addr, role, None, Stub(f"{role}-{addr}", fail_load), load=load, healthy=True)


def _servicer(workers, routes=(), index=None):
    m = Membership()
    m.workers = {w.address: w for w in workers}
    bases = [BaseModel(n, n, RequestParser(None, model=n, match_model=False), TokenTexts(None))
             for n in ("tiny", "tiny-qwen2")]
    catalog = ModelCatalog(m, bases, tuple(parse_route(r) for r in routes), seed=0)
    policy = PairPolicy("cache_aware", index or PrefixIndex(), local_prefill_tokens=0)
    return GenerationServicer(m, policy, tokenizer=None, catalog=catalog), m


def _run(g, **fields):
    async def go():
        return [r async for r in g.respond(pb.GenerateRequest(token_ids=list(range(1, 30)), **fields))]

    return asyncio.run(go())


def test_pairs_stay_within_the_request_models_pools_and_the_response_names_the_model():
    workers = [_worker("p1:1", "prefill", "tiny"), _worker("d1:1", "decode", "tiny"),
               _worker("d2:1", "decode", "tiny-qwen2")]
    g, m = _servicer(workers)
    for model, decode, prefill in [("", "d1:1", "p1:1"), ("tiny", "d1:1", "p1:1"), ("tiny-qwen2", "d2:1", "")]:
        final = _run(g, model=model)[-1]
        assert (final.decode_worker, final.prefill_worker) == (decode, prefill)
        assert final.model == (model or "tiny")
    assert all(d.prefill_address in ("", "p1:1") for d in m.workers["d1:1"].stub.decodes)
    with pytest.raises(RequestNotFoundError, match="model: 'gpt-4' is not served here"):
        _run(g, model="gpt-4")
    w = m.workers["d1:1"]  # 30 adapters: the error lists 20 of the 32 names and says how many more
    w.load = dataclasses.replace(w.load, adapters=tuple(f"ad{i:02d}" for i in range(30)))
    with pytest.raises(RequestNotFoundError, match=r"\.\.\. 12 more: Generation.Models lists them\)"):
        _run(g, model="gpt-4")


def test_an_adapter_request_carries_its_adapter_and_prefers_workers_holding_it_resident():
    workers = [_worker("d1:1", "decode", "tiny", ["ad1"], resident=()), _worker("d2:1", "decode", "tiny", ["ad1"]),
               _worker("d3:1", "decode", "tiny")]
    g, m = _servicer(workers, routes=["split=tiny:50,ad1:50"])
    final = _run(g, model="ad1")[-1]
    assert final.model == "ad1" and final.decode_worker == "d2:1"
    assert m.workers["d2:1"].stub.decodes[-1].lora_name == "ad1"
    models = {_run(g, model="split", session_id=f"s{i}")[-1].model for i in range(30)}
    assert models == {"tiny", "ad1"}
    sticky = {_run(g, model="split", session_id="same")[-1].model for _ in range(10)}
    assert len(sticky) == 1
    assert not g.catalog.running  # every adapter request counted while it ran, and no longer


def test_prefix_hashes_are_keyed_by_adapter():
    prompt = list(range(1, 30))
    base, lora = block_hashes(prompt, 4, 0), block_hashes(prompt, 4, 0, adapter_extra("ad1"))
    assert not set(base) & set(lora)
    idx = PrefixIndex()
    idx.apply("d1:1", BlockEvents(seq=1, snapshot=True, stored=tuple(lora)))  # d1 holds the prompt under ad1
    workers = [_worker("d1:1", "decode", "tiny", ["ad1"]), _worker("d2:1", "decode", "tiny", ["ad1"])]
    g, _ = _servicer(workers, index=idx)
    assert _run(g, model="ad1")[-1].decode_worker == "d1:1"
    assert _run(g, model="ad1")[-1].usage.prompt_tokens == len(prompt)
    st_hashes = g.failover._prefix_hashes
    from pdserve.router.responses import RequestState

    req = g.parser.parse(pb.GenerateRequest(token_ids=prompt))
    assert st_hashes(RequestState.of(dataclasses.replace(req, lora_name="ad1")), 4, 0) == lora
    assert st_hashes(RequestState.of(req), 4, 0)[:1] == base[:1]


def test_load_adapter_fans_out_to_the_pool_and_rolls_back_on_failure():
    workers = [_worker("p1:1", "prefill", "tiny"), _worker("d1:1", "decode", "tiny"),
               _worker("d2:1", "decode", "tiny-qwen2")]
    g, m = _servicer(workers)
    admin = AdapterAdmin(m, g.catalog)
    ids = asyncio.run(admin.load("ad1", "/x/ad1"))
    assert sorted(ids) == ["decode-d1:1", "prefill-p1:1"]
    assert m.workers["d2:1"].stub.calls == []  # another base model's pool
    bad = [_worker("p1:1", "prefill", "tiny"), _worker("d1:1", "decode", "tiny", fail_load=True)]
    g, m = _servicer(bad)
    admin = AdapterAdmin(m, g.catalog)
    with pytest.raises(RpcStatusError, match="decode worker d1:1: path: no adapter_config.json"):
        asyncio.run(admin.load("ad1", "/nope"))
    assert m.workers["p1:1"].stub.calls == [("load", "ad1", "/nope"), ("unload", "ad1")]  # rolled back
    with pytest.raises(RequestNotFoundError, match="base_model: 'ghost'"):
        asyncio.run(admin.load("ad1", "/x", "ghost"))
    with pytest.raises(ValueError, match="already a base model"):
        asyncio.run(admin.load("tiny-qwen2", "/x"))


def test_unload_hides_the_adapter_at_once_and_waits_for_its_running_requests():
    workers = [_worker("d1:1", "decode", "tiny", ["ad1"])]
    g, m = _servicer(workers)
    admin = AdapterAdmin(m, g.catalog)

    async def go():
        g.catalog.begin(g.catalog.resolve("ad1"))  # one request resolved to it, still running
        task = asyncio.create_task(admin.unload("ad1"))
        await asyncio.sleep(0.1)
        assert not task.done() and m.workers["d1:1"].stub.calls == []  # waits for the running request
        with pytest.raises(RequestNotFoundError, match="ad1"):
            g.catalog.resolve("ad1")  # but new requests are refused already
        g.catalog.end(Target("ad1", "tiny", "ad1"))
        return await task

    assert asyncio.run(go()) == (True, ["decode-d1:1"])
    assert m.workers["d1:1"].stub.calls == [("unload", "ad1")]
    with pytest.raises(RequestNotFoundError, match="no adapter 'ghost'"):
        asyncio.run(admin.unload("ghost"))
    with pytest.raises(InvalidRequestError, match="name: 'tiny' is a base model, not an adapter"):
        asyncio.run(admin.unload("tiny"))


def test_the_openai_gateway_reports_the_model_that_served():
    from pdserve.router.gateway.openai_request import Plan
    from pdserve.router.gateway.openai_response import StreamChunks, full_response

    plan = Plan("completion", "cmpl-1", "canary", (pb.GenerateRequest(model="canary"),), 1, False, False, None, False)
    final = pb.GenerateResponse(text="x", finish_reason="length", model="base-lora-v2")
    assert full_response(plan, [final], 0)["model"] == "base-lora-v2"
    chunks = StreamChunks(plan, 0)
    assert chunks.chunk(0, pb.GenerateResponse(text="a"))["model"] == "canary"  # not known before the end
    assert chunks.chunk(0, final)["model"] == "base-lora-v2"
    assert chunks.usage_chunk()["model"] == "base-lora-v2"


def test_a_worker_that_joins_later_gets_the_adapters_loaded_through_the_api():
    workers = [_worker("d1:1", "decode", "tiny"), _worker("d9:1", "decode", "tiny-qwen2")]
    g, m = _servicer(workers)
    admin = AdapterAdmin(m, g.catalog, interval_s=3600)

    async def go():
        await admin.load("ad1", "/x/ad1")
        m.workers["d1:1"].load = dataclasses.replace(m.workers["d1:1"].load, adapters=("ad1",))  # as polled
        late = _worker("d2:1", "decode", "tiny")  # a restarted or new worker of the pool: no adapters yet
        m.workers[late.address] = late
        done = await admin.reconcile()
        assert late.stub.calls == [("load", "ad1", "/x/ad1")] and done == ["ad1@d2:1"]
        assert m.workers["d1:1"].stub.calls == [("load", "ad1", "/x/ad1")]  # only the first load
        assert m.workers["d9:1"].stub.calls == []  # another base model
        await admin.unload("ad1")
        assert await admin.reconcile() == []  # unloaded: never loaded again
        admin.close()

    asyncio.run(go())


def test_a_restarted_router_catches_new_workers_up_from_what_the_workers_report():
    """Routers keep no adapter state of their own that matters: a fresh AdapterAdmin (a restarted router, or
    another replica) learns API loads from the workers' records and never revives an unloaded version."""
    from pdserve.serving.adapter_records import AdapterRecord

    live = AdapterRecord("ad1", "/x/ad1", "v1")
    dead = AdapterRecord("ad2", "/x/ad2", "v7")
    holder = _worker("d1:1", "decode", "tiny", ["ad1", "ad2"])
    holder.load = dataclasses.replace(holder.load, api_adapters=(live, dead))
    other = _worker("d3:1", "decode", "tiny")  # reports ad2's version v7 unloaded: it is on its way out
    other.load = dataclasses.replace(other.load, api_adapters=(AdapterRecord("ad2", "", "v7", unloaded=True),))
    late = _worker("d2:1", "decode", "tiny")
    g, m = _servicer([holder, other, late])
    admin = AdapterAdmin(m, g.catalog, interval_s=3600)

    async def go():
        done = sorted(await admin.reconcile())
        assert done == ["ad1@d2:1", "ad1@d3:1"], done  # ad1 everywhere it lacks; ad2 (tombstoned) nowhere
        (req,) = late.stub.requests
        assert (req.name, req.path, req.version) == ("ad1", "/x/ad1", "v1")
        was_loaded, dropped = await admin.unload("ad1")
        assert was_loaded and sorted(dropped) == ["decode-d1:1", "decode-d2:1", "decode-d3:1"]
        assert {r.version for w in (holder, late, other) for r in w.stub.requests if r.name == "ad1"} == {"v1"}
        admin.close()

    asyncio.run(go())


def test_each_api_load_gets_a_version_the_workers_record():
    workers = [_worker("d1:1", "decode", "tiny")]
    g, m = _servicer(workers)
    admin = AdapterAdmin(m, g.catalog, interval_s=3600)

    async def go():
        await admin.load("ad1", "/x/ad1")
        await admin.load("ad1", "/x/ad1-v2")  # loaded anew under the same name: a new version
        admin.close()

    asyncio.run(go())
    v1, v2 = (r.version for r in m.workers["d1:1"].stub.requests)
    assert v1 and v2 and v1 != v2


def test_a_prompt_too_long_for_the_model_is_invalid_even_while_its_workers_are_down():
    """A CI fuzz run caught this: with the only decode worker's circuit open for a moment, a 2,048-token prompt
    (context 2,048) got UNAVAILABLE, which a client retries, instead of INVALID_ARGUMENT."""
    from pdserve.engine.errors import InvalidRequestError, UnavailableError

    workers = [_worker("d1:1", "decode", "tiny")]
    g, m = _servicer(workers)
    m.mark_failed(m.workers["d1:1"])
    assert not m.workers["d1:1"].available and m.max_model_len("tiny") == 4096
    with pytest.raises(InvalidRequestError, match="exceeds the context limit of 4095"):
        asyncio.run(_collect(g, pb.GenerateRequest(token_ids=[1] * 4096)))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        asyncio.run(_collect(g, pb.GenerateRequest(token_ids=[1, 5000])))
    with pytest.raises(UnavailableError):
        asyncio.run(_collect(g, pb.GenerateRequest(token_ids=[1, 2, 3])))


async def _collect(g, request):
    return [r async for r in g.respond(request)]


def test_adapter_base_agrees_with_the_adapter_map():
    workers = [_worker("d1:1", "decode", "tiny", ["ad1", "ad2"]), _worker("d2:1", "decode", "tiny-qwen2", ["ad3"]),
               _worker("p1:1", "prefill", "tiny", ["ad1"])]
    g, _ = _servicer(workers)
    catalog = g.catalog
    catalog.hidden.add("ad2")
    for name in ("ad1", "ad2", "ad3", "tiny", "nope"):
        assert catalog.adapter_base(name) == catalog.adapters().get(name), name
    assert catalog.adapter_base("ad3") == "tiny-qwen2" and catalog.adapter_base("ad2") is None
