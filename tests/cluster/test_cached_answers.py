"""The router's response cache on a real cluster: a hit replays the exact answer without a worker, says so
(``cached``, metrics), and never crosses tenants (API keys); bypass and refresh; unseeded sampling is never
cached."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from tests.ops.test_metrics_and_lifecycle import scrape, total

S = pb.SamplingParams
KEYS = {"key-alice": "alice", "key-bob": "bob", "key-t1": "team1", "key-t2": "team2"}


@pytest.fixture(scope="module")
def cached_cluster(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    args = ["--api-keys", str(keys), "--response-cache-mib", "8", "--cache-shared-tenants", "team1,team2",
            "--metrics-port", "-1"]
    with LocalCluster(1, 1, router_args=args) as c:
        yield c


def ask(address: str, key: str, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            md = (("authorization", f"Bearer {key}"),)
            return [r async for r in pb_grpc.GenerationStub(ch).Generate(req, metadata=md, timeout=60)]

    return asyncio.run(go())


def tokens(msgs):
    return [t for m in msgs for t in m.token_ids]


def test_hits_replay_the_exact_answer_within_a_tenant_and_never_across(cached_cluster):
    c = cached_cluster
    router = next(p for p in c.procs if p.role == "router")
    before = scrape(router.metrics_port)
    req = pb.GenerateRequest(token_ids=list(range(20, 60)), sampling=S(max_tokens=24, temperature=0, ignore_eos=True))
    first = ask(c.router_address, "key-alice", req)
    assert not first[-1].cached and first[-1].decode_worker
    hit = ask(c.router_address, "key-alice", req)
    assert hit[-1].cached and hit[-1].decode_worker == "" and len(tokens(hit)) == 24
    assert tokens(hit) == tokens(first) and "".join(m.text for m in hit) == "".join(m.text for m in first)
    bob = ask(c.router_address, "key-bob", req)  # another tenant: computed again, never alice's entry
    assert not bob[-1].cached and tokens(bob) == tokens(first)
    assert ask(c.router_address, "key-bob", req)[-1].cached, "bob now hits his own entry"
    # shared tenants share one scope
    assert not ask(c.router_address, "key-t1", req)[-1].cached
    assert ask(c.router_address, "key-t2", req)[-1].cached
    after = scrape(router.metrics_port)
    hits = total(after, "pdserve_router_response_cache_hits_total") - total(before, "pdserve_router_response_cache_hits_total")
    misses = (total(after, "pdserve_router_response_cache_misses_total")
              - total(before, "pdserve_router_response_cache_misses_total"))
    assert (hits, misses) == (3, 3)


def test_modes_seeded_and_unseeded(cached_cluster):
    c = cached_cluster
    seeded = pb.GenerateRequest(prompt="The sea", sampling=S(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True))
    first = ask(c.router_address, "key-alice", seeded)
    assert ask(c.router_address, "key-alice", seeded)[-1].cached
    seeded.cache = pb.CACHE_BYPASS
    assert not ask(c.router_address, "key-alice", seeded)[-1].cached
    seeded.cache = pb.CACHE_REFRESH
    refreshed = ask(c.router_address, "key-alice", seeded)
    assert not refreshed[-1].cached and tokens(refreshed) == tokens(first), "seeded: the same tokens again"
    seeded.cache = pb.CACHE_USE
    assert ask(c.router_address, "key-alice", seeded)[-1].cached
    unseeded = pb.GenerateRequest(prompt="The sea", sampling=S(max_tokens=8, temperature=0.8))
    assert not any(ask(c.router_address, "key-alice", unseeded)[-1].cached for _ in range(2))
    bad = pb.GenerateRequest(prompt="The sea", sampling=S(max_tokens=4), cache=9)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        ask(c.router_address, "key-alice", bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache" in err.value.details()
