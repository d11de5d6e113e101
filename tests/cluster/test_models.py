"""Two base models in one cluster (real processes): each answers like the offline LLM of that model, unknown names
are NOT_FOUND, ListModels and Models list them, and a route splits sessions between them (sticky)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve import LLM, SamplingParams
from pdserve.deploy.cli_models import ModelPool
from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.routes import parse_route

PROMPTS = [list(range(3, 40)), [7, 8, 9] * 11, list(range(100, 170, 2))]
MAX_TOKENS = 8
ROUTE = "mix=tiny:70,tiny-qwen2:30"


def _sampling() -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def expected() -> dict[str, list[list[int]]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return {m: [o.token_ids for o in LLM(m).generate(PROMPTS, params)] for m in ("tiny", "tiny-qwen2")}


@pytest.fixture(scope="module")
def cluster():
    pools = [ModelPool("tiny", "tiny", 1, 1), ModelPool("tiny-qwen2", "tiny-qwen2", 0, 1)]
    with LocalCluster(pools=pools, router_args=["--route", ROUTE, "--local-prefill-tokens", "0"]) as c:
        yield c


def _complete_all(address: str, reqs: list[pb.GenerateRequest]) -> list:
    async def one(stub, req):
        try:
            return await stub.Complete(req, timeout=60)
        except grpc.aio.AioRpcError as e:
            return e

    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.GenerationStub(ch)
            return await asyncio.gather(*(one(stub, r) for r in reqs))

    return asyncio.run(go())


def _admin(address: str, method: str, req):
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            return await getattr(pb_grpc.AdminStub(ch), method)(req, timeout=30)

    return asyncio.run(go())


def test_each_base_model_answers_like_its_offline_llm(cluster, expected):
    rows = {m.name: m for m in _admin(cluster.router_address, "ListModels", pb.ListModelsRequest()).models}
    cases = [(m, i) for m in ("", "tiny", "tiny-qwen2") for i in range(len(PROMPTS))]
    answers = _complete_all(cluster.router_address, [pb.GenerateRequest(token_ids=PROMPTS[i], model=m,
                                                                        sampling=_sampling()) for m, i in cases])
    for (model, i), resp in zip(cases, answers, strict=True):
        assert not isinstance(resp, Exception), resp
        served = model or "tiny"  # empty: the default, the first base model
        assert resp.model == served
        assert list(resp.token_ids) == expected[served][i], (model, i)
        assert resp.decode_worker in rows[served].worker_addresses  # paired within the model's own pool
        assert resp.prefill_worker in ("", *rows[served].worker_addresses)
    assert expected["tiny"] != expected["tiny-qwen2"]  # the two models really differ


def test_unknown_model_is_not_found_naming_it(cluster):
    [err] = _complete_all(cluster.router_address, [pb.GenerateRequest(prompt="hi", model="gpt-4")])
    assert isinstance(err, grpc.aio.AioRpcError)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'gpt-4'" in err.details()


def test_list_models_and_models(cluster):
    rows = {m.name: m for m in _admin(cluster.router_address, "ListModels", pb.ListModelsRequest()).models}
    assert set(rows) == {"tiny", "tiny-qwen2", "mix"}
    tiny, qwen, mix = rows["tiny"], rows["tiny-qwen2"], rows["mix"]
    assert (tiny.kind, qwen.kind, mix.kind) == (pb.MODEL_KIND_BASE, pb.MODEL_KIND_BASE, pb.MODEL_KIND_ROUTE)
    assert len(tiny.worker_ids) == 2 and len(qwen.worker_ids) == 1  # 1P+1D and 0P+1D
    assert {w.address for w in cluster.workers("decode")} == {*tiny.worker_addresses, *qwen.worker_addresses} - {
        p.address for p in cluster.workers("prefill")}
    assert tiny.state == qwen.state == mix.state == "ready" and qwen.base_model == "tiny-qwen2"
    assert [(t.model, t.weight) for t in mix.targets] == [("tiny", 70), ("tiny-qwen2", 30)]

    async def models():
        async with grpc.aio.insecure_channel(cluster.router_address) as ch:
            return await pb_grpc.GenerationStub(ch).Models(pb.ModelsRequest(), timeout=10)

    listed = {m.id: m for m in asyncio.run(models()).models}
    assert set(listed) == {"tiny", "tiny-qwen2", "mix"} and listed["tiny-qwen2"].max_model_len > 0


def test_a_route_splits_sessions_by_weight_and_sticks_to_them(cluster, expected):
    route = parse_route(ROUTE)
    sessions = [f"user-{i}" for i in range(24)]
    reqs = [pb.GenerateRequest(token_ids=PROMPTS[0], model="mix", session_id=s, sampling=_sampling())
            for s in sessions for _ in range(2)]
    answers = _complete_all(cluster.router_address, reqs)
    served = {}
    for req, resp in zip(reqs, answers, strict=True):
        assert not isinstance(resp, Exception), resp
        assert resp.model == route.choose(req.session_id)  # the session's fixed bucket
        assert served.setdefault(req.session_id, resp.model) == resp.model  # sticky
        assert list(resp.token_ids) == expected[resp.model][0]
    assert set(served.values()) == {"tiny", "tiny-qwen2"}
