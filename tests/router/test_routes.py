"""Traffic splits (router.routes) and the model catalog (router.models), without processes."""

from __future__ import annotations

import collections
import random

import pytest

from pdserve.engine.errors import RequestNotFoundError
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Membership, Worker
from pdserve.router.models import BaseModel, ModelCatalog
from pdserve.router.routes import Route, parse_route, parse_routes
from pdserve.serving.model_names import parse_named, parse_named_list, served_name


def test_parse_route_and_its_errors():
    r = parse_route("chat=base:90,base-lora-v2:10")
    assert r.name == "chat" and r.targets == (("base", 90), ("base-lora-v2", 10)) and r.total_weight == 100
    for bad, word in [("chat", "expected NAME="), ("chat=", "expected NAME="), ("chat=base", "MODEL:WEIGHT"),
                      ("chat=base:x", "integer"), ("chat=base:0", "weight"), ("chat=a:1,a:2", "twice"),
                      ("=a:1", "route")]:
        with pytest.raises(ValueError, match=word):
            parse_route(bad)
    with pytest.raises(ValueError, match="given twice"):
        parse_routes(["r=a:1", "r=b:1"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_90_10_route_lands_within_3_points_over_2000_requests(seed):
    route = parse_route("chat=base:90,base-lora-v2:10")
    rng = random.Random(seed)
    picks = [route.choose(rng=rng) for _ in range(2000)]  # no session: random by weight
    share = picks.count("base-lora-v2") / len(picks) * 100
    assert abs(share - 10) <= 3, share
    sessions = [route.choose(f"session-{seed}-{i}") for i in range(2000)]  # one request per session: by hash
    share = sessions.count("base-lora-v2") / len(sessions) * 100
    assert abs(share - 10) <= 3, share


def test_the_choice_is_sticky_per_session_and_depends_on_the_route():
    route = parse_route("chat=a:50,b:50")
    rng = random.Random(5)
    for i in range(200):
        first = route.choose(f"user-{i}", rng)
        assert all(route.choose(f"user-{i}", rng) == first for _ in range(5))
    picks = {route.choose(f"user-{i}") for i in range(50)}
    assert picks == {"a", "b"}  # sessions spread over both targets
    other = parse_route("other=a:50,b:50")
    differs = sum(route.choose(f"u{i}") != other.choose(f"u{i}") for i in range(400))
    assert 100 < differs < 300  # each route hashes sessions on its own


def test_model_names():
    assert served_name("tiny") == "tiny"
    assert parse_named("base=tiny", "--model") == ("base", "tiny")
    assert parse_named("tiny-qwen2", "--model") == ("tiny-qwen2", "tiny-qwen2")
    with pytest.raises(ValueError, match="--lora"):
        parse_named("bad name=x", "--lora")
    with pytest.raises(ValueError, match="given twice"):
        parse_named_list(["a=x", "a=y"], "--model")


def _worker(addr, role, model, adapters=(), resident=()):
    load = WorkerLoad(address=addr, role=role, worker_id=f"{role}-{addr}", served_model=model,
                      adapters=tuple(adapters), resident_adapters=tuple(resident))
    return Worker(addr, role, None, None, load=load, healthy=True)


def _catalog(workers, routes=()):
    m = Membership()
    m.workers = {w.address: w for w in workers}
    bases = [BaseModel(n, n, parser=None, token_texts=None) for n in ("tiny", "tiny-qwen2")]
    return ModelCatalog(m, bases, tuple(parse_route(r) for r in routes), seed=0), m


def test_catalog_resolves_bases_adapters_and_routes_and_lists_them():
    workers = [_worker("p1:1", "prefill", "tiny", ["ad1"]), _worker("d1:1", "decode", "tiny", ["ad1"]),
               _worker("d2:1", "decode", "tiny-qwen2"), _worker("d3:1", "decode", "other-model")]
    cat, m = _catalog(workers, ["mix=tiny:90,ad1:10"])
    assert cat.resolve("").base == "tiny" and cat.resolve("").lora == ""
    assert (cat.resolve("tiny-qwen2").name, cat.resolve("tiny-qwen2").base) == ("tiny-qwen2", "tiny-qwen2")
    t = cat.resolve("ad1")
    assert (t.name, t.base, t.lora) == ("ad1", "tiny", "ad1")
    assert {cat.resolve("mix", f"s{i}").name for i in range(100)} == {"tiny", "ad1"}
    with pytest.raises(RequestNotFoundError, match="model: 'nope' is not served here"):
        cat.resolve("nope")
    assert [w.address for w in m.pool("decode", model="tiny")] == ["d1:1"]
    assert [w.address for w in m.pool("decode", model="tiny-qwen2")] == ["d2:1"]  # other-model: in no pool
    rows = {e.name: e for e in cat.entries()}
    assert set(rows) == {"tiny", "tiny-qwen2", "ad1", "mix"}
    assert rows["tiny"].kind == "base" and {w.address for w in rows["tiny"].workers} == {"p1:1", "d1:1"}
    assert rows["ad1"].kind == "adapter" and rows["ad1"].base == "tiny" and rows["ad1"].state == "ready"
    assert rows["mix"].kind == "route" and rows["mix"].targets == (("tiny", 90), ("ad1", 10))
    cat.hidden.add("ad1")  # unloading through this router: NOT_FOUND at once, listed as unloading
    with pytest.raises(RequestNotFoundError, match="ad1"):
        cat.resolve("ad1")
    assert {e.name: e.state for e in cat.entries()}["ad1"] == "unloading"
    assert {e.name: e.state for e in cat.entries()}["mix"] == "missing target"


def test_adapter_state_is_loading_until_every_pool_worker_holds_it():
    workers = [_worker("p1:1", "prefill", "tiny"), _worker("d1:1", "decode", "tiny", ["ad1"])]
    cat, _ = _catalog(workers)
    assert {e.name: e.state for e in cat.entries()}["ad1"] == "loading"


def test_a_route_with_no_served_target_is_not_found_naming_its_targets():
    cat, _ = _catalog([_worker("d1:1", "decode", "tiny")], ["r=ghost:1,phantom:2"])
    with pytest.raises(RequestNotFoundError, match=r"route 'r': none of its targets \(ghost, phantom\) is served"):
        cat.resolve("r")


def test_a_route_skips_a_target_nobody_serves_and_splits_the_rest_by_weight():
    """A canary adapter not loaded yet (or unloaded) does not fail its share: every request is served by the
    targets that are, by their weights; once it is served, sessions land where they did before."""
    workers = [_worker("d1:1", "decode", "tiny", ["ad1"])]
    cat, _ = _catalog(workers, ["mix=tiny:60,canary:10,ad1:30"])
    got = collections.Counter(cat.resolve("mix", f"s{i}").name for i in range(2000))
    assert set(got) == {"tiny", "ad1"} and sum(got.values()) == 2000
    assert abs(got["tiny"] / 2000 - 0.6 / 0.9) < 0.03, got
    full = Route("mix", (("tiny", 60), ("canary", 10), ("ad1", 30)))
    assert all(full.choose(f"s{i}") == full.choose(f"s{i}", served=lambda _: True) for i in range(200))
    assert full.choose("s1", served=lambda _: False) is None


def test_an_adapter_a_worker_reports_under_a_base_or_route_name_is_not_listed_twice():
    workers = [_worker("d1:1", "decode", "tiny", ["tiny", "mix", "ad1"])]  # e.g. pdserve decode --lora tiny=...
    cat, _ = _catalog(workers, ["mix=tiny:1"])
    assert cat.names() == ["tiny", "tiny-qwen2", "ad1", "mix"]
    assert [(e.name, e.kind) for e in cat.entries()].count(("tiny", "base")) == 1
    assert sorted(e.name for e in cat.entries()) == sorted(set(e.name for e in cat.entries()))
    assert cat.resolve("tiny").lora == "" and cat.resolve("ad1").lora == "ad1"


def test_catalog_refuses_a_route_named_like_a_base_model():
    with pytest.raises(ValueError, match="also a base model"):
        _catalog([], [Route("tiny", (("tiny-qwen2", 1),)).name + "=tiny-qwen2:1"])


def test_each_base_model_parses_with_its_own_tokenizer_and_chat_template():
    import asyncio

    from pdserve.engine.errors import InvalidRequestError
    from pdserve.engine.models import resolve_tokenizer
    from pdserve.engine.tokenizer import load_light_tokenizer
    from pdserve.protos import pdserve_pb2 as pb
    from pdserve.router.models import load_catalog

    m = Membership()
    cat = asyncio.run(load_catalog(m, (("chat", "tiny-chat"), ("tiny", "tiny")), ("r=chat:1,tiny:1",)))
    assert cat.default == "chat" and set(cat.routes) == {"r"}
    msgs = [pb.ChatMessage(role="user", content="In the beginning")]
    chat = cat.bases["chat"].parser.parse(pb.GenerateRequest(messages=msgs, model="chat"))
    hello = pb.GenerateRequest(prompt="hello world", model="tiny")
    for name, path in (("chat", "tiny-chat"), ("tiny", "tiny")):
        want = tuple(load_light_tokenizer(resolve_tokenizer(path)).encode("hello world"))
        assert cat.bases[name].parser.parse(hello).token_ids == want
    assert chat.token_ids and cat.bases["chat"].parser.parse(hello).token_ids != cat.bases["tiny"].parser.parse(
        hello).token_ids  # two tokenizers really
    with pytest.raises(InvalidRequestError, match="model 'tiny' has no chat template"):
        cat.bases["tiny"].parser.parse(pb.GenerateRequest(messages=msgs, model="tiny"))


def test_an_unknown_worker_address_is_named_briefly():
    from pdserve.serving.errors import message_for, status_for

    with pytest.raises(KeyError) as info:
        Membership().get("x" * 10_000)  # Admin.Drain / Undrain with a junk address
    assert status_for(info.value).name == "NOT_FOUND"
    assert message_for(info.value).startswith("address: no worker 'xxx") and len(message_for(info.value)) < 300
