"""The gateway's translation, without a cluster: OpenAI bodies -> router requests, router statuses -> HTTP."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.gateway.errors import GatewayError, from_rpc_error
from pdserve.router.gateway.openai_request import MAX_CHOICES, load_body, parse
from pdserve.router.gateway.openai_response import StreamChunks, completion_logprobs, full_response


def test_a_completion_body_becomes_one_request_per_choice():
    plan = parse({"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 10, "max_tokens": 5, "temperature": 0.5,
                  "top_p": 0.9, "stop": "x", "user": "alice", "logprobs": 2}, "completion")
    assert [r.prompt for r in plan.requests] == ["a", "a", "b", "b"]
    assert [r.sampling.seed for r in plan.requests] == [10, 11, 10, 11]  # sample j: seed + j
    assert [r.request_id for r in plan.requests] == [f"{plan.id}-{i}" for i in range(4)]
    r = plan.requests[0]
    assert (r.model, r.tenant, r.sampling.max_tokens, r.sampling.top_p, list(r.sampling.stop)) == \
        ("m", "alice", 5, pytest.approx(0.9), ["x"])
    assert r.sampling.logprobs == 2 and plan.logprobs == 2 and not plan.stream
    assert plan.id.startswith("cmpl-")
    ids = parse({"prompt": [[1, 2], [3]]}, "completion").requests
    assert [list(r.token_ids) for r in ids] == [[1, 2], [3]]
    assert not parse({"prompt": "a"}, "completion").requests[0].sampling.HasField("max_tokens")  # router's 16


def test_a_chat_body():
    plan = parse({"messages": [{"role": "developer", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text",
                                                                                           "text": "there"}]},
                               {"role": "assistant", "content": None}],
                  "max_tokens": 3, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 4,
                  "stream": True, "stream_options": {"include_usage": True}}, "chat", default_chat_max_tokens=99)
    (r,) = plan.requests
    assert [(m.role, m.content) for m in r.messages] == [("system", "be brief"), ("user", "hi there"),
                                                          ("assistant", "")]
    assert r.sampling.max_tokens == 7 and r.sampling.logprobs == 4 and plan.include_usage and plan.stream
    assert parse({"messages": [{"role": "user", "content": "x"}]}, "chat", 99).requests[0].sampling.max_tokens == 99
    assert parse({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "chat").logprobs == 0
    assert parse({"messages": [{"role": "user", "content": "x"}]}, "chat").logprobs is None


BAD = {
    "not an object": ([1], "body"),
    "no prompt": ({}, "prompt"),
    "mixed prompt": ({"prompt": ["a", [1]]}, "prompt"),
    "token id over int32": ({"prompt": [1 << 40]}, "prompt"),
    "max_tokens type": ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    "max_tokens bool": ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    "max_tokens over int32": ({"prompt": "a", "max_tokens": 1 << 40}, "max_tokens"),
    "temperature string": ({"prompt": "a", "temperature": "hot"}, "temperature"),
    "n": ({"prompt": "a", "n": 0}, "n"),
    "too many choices": ({"prompt": ["a"] * 5, "n": 64}, "n"),
    "too many prompts": ({"prompt": ["a"] * 257}, "prompt"),  # n was not set, yet it was blamed
    "stop": ({"prompt": "a", "stop": [1]}, "stop"),
    "stream_options without stream": ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    # vLLM's usage in every chunk: a client counting on it got chunks with no usage
    "continuous usage": ({"prompt": "a", "stream": True, "stream_options": {"include_usage": True,
                                                                          "continuous_usage_stats": True}},
                         "stream_options.continuous_usage_stats"),
    "echo on chat": ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    "prompt_logprobs range": ({"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs"),
    "best_of": ({"prompt": "a", "best_of": 3}, "best_of"),
    "penalty type": ({"prompt": "a", "presence_penalty": "high"}, "presence_penalty"),
    "min_tokens type": ({"prompt": "a", "min_tokens": 1.5}, "min_tokens"),
    "logprobs range": ({"prompt": "a", "logprobs": 21}, "logprobs"),
    "user": ({"prompt": "a", "user": 5}, "user"),
    "model": ({"prompt": "a", "model": 5}, "model"),
    "no messages": ({"messages": []}, "messages"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    "role type": ({"messages": [{"role": 1, "content": "x"}]}, "messages[0]"),
    "top_logprobs alone": ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    "tools": ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    # JSON may carry a lone surrogate ("\\ud800"); it cannot become a protobuf string (it was a 500)
    "lone surrogate prompt": ({"prompt": "a\ud800"}, "prompt"),
    "lone surrogate in a prompt list": ({"prompt": ["a", "\udc00"]}, "prompt[1]"),
    "lone surrogate stop": ({"prompt": "a", "stop": ["x", "\ud83d"]}, "stop[1]"),
    "lone surrogate user": ({"prompt": "a", "user": "\ud800"}, "user"),
    "lone surrogate content": ({"messages": [{"role": "user", "content": "\ud83d"}]}, "messages[0].content"),
    "lone surrogate part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
                            "messages[0].content[0].text"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_bodies_are_400_naming_the_field(case):
    body, param = BAD[case]
    kind = "chat" if "messages" in body or param.startswith(("messages", "top_logprobs", "tools")) else "completion"
    with pytest.raises(GatewayError) as err:
        parse(body, kind)
    e = err.value
    assert e.status == 400 and e.param == param and e.message.startswith(param)
    assert e.body()["error"]["type"] == "invalid_request_error"
    assert MAX_CHOICES == 256


def rpc_error(code, details, trailing=()):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INTERNAL, 500),
])
def test_router_statuses_map_to_http(code, status):
    e = from_rpc_error(rpc_error(code, "max_tokens: must be positive"))
    assert e.status == status
    assert e.param == ("max_tokens" if status < 500 else None)


def test_retry_after_and_codes():
    e = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant: rate limited",
                                 [("retry-after-ms", "2500")]))
    assert e.headers() == {"Retry-After": "3"} and e.type == "rate_limit_error"
    assert from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")).headers() == {"Retry-After": "1"}
    assert from_rpc_error(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "no key")).code == "invalid_api_key"
    nf = from_rpc_error(rpc_error(grpc.StatusCode.NOT_FOUND, "model: 'x' is not served here"))
    assert (nf.code, nf.param) == ("model_not_found", "model")
    assert from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "token_ids: 9 is outside")).param == "prompt"


def final(text, ids, prompt_tokens, reason="length"):
    r = pb.GenerateResponse(text=text, token_ids=ids, finish_reason=reason)
    r.usage.prompt_tokens, r.usage.completion_tokens = prompt_tokens, len(ids)
    return r


def test_responses_count_each_prompt_once():
    plan = parse({"prompt": ["a", "bb"], "n": 2}, "completion")
    out = full_response(plan, [final("x", [1], 2), final("y", [2, 3], 2), final("z", [4], 3), final("w", [5], 3)], 1)
    assert [c["text"] for c in out["choices"]] == ["x", "y", "z", "w"]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    chat = parse({"messages": [{"role": "user", "content": "q"}], "stream": True,
                  "stream_options": {"include_usage": True}}, "chat")
    chunks = StreamChunks(chat, 1)
    first = chunks.chunk(0, pb.GenerateResponse(text="he"))
    last = chunks.chunk(0, final("llo", [7], 4, "stop"))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "he"} and first["usage"] is None
    assert last["choices"][0]["delta"] == {"content": "llo"} and last["choices"][0]["finish_reason"] == "stop"
    assert chunks.usage_chunk()["usage"]["prompt_tokens"] == 4 and chunks.usage_chunk()["choices"] == []


def test_a_dead_router_is_503_and_health_says_so():
    """A gateway whose router is not there: requests are 503 UNAVAILABLE, /health is 503."""
    import aiohttp

    from pdserve.router.gateway.server import GatewayConfig, serve

    async def go():
        ready, stop = asyncio.get_running_loop().create_future(), asyncio.Event()
        task = asyncio.ensure_future(serve(GatewayConfig(router="127.0.0.1:1", port=0, timeout_s=5), ready, stop))
        url = await asyncio.wait_for(ready, 30)
        try:
            async with aiohttp.ClientSession() as s:
                r = await s.post(url + "/completions", json={"prompt": "hi"})
                body = await r.json()
                h = await s.get(url[: -len("/v1")] + "/health")
                return r.status, body, h.status
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    status, body, health = asyncio.run(go())
    assert status == 503 and body["error"]["type"] == "service_unavailable" and health == 503


def test_the_cache_extension_sets_the_router_cache_mode_and_a_bad_one_is_a_400():
    assert parse({"prompt": "a"}, "completion").requests[0].cache == pb.CACHE_USE
    for name, mode in (("use", pb.CACHE_USE), ("bypass", pb.CACHE_BYPASS), ("refresh", pb.CACHE_REFRESH)):
        plan = parse({"messages": [{"role": "user", "content": "hi"}], "n": 2, "cache": name}, "chat")
        assert [r.cache for r in plan.requests] == [mode, mode]
    for bad in ("never", 1, ["use"]):
        with pytest.raises(GatewayError, match="cache"):
            parse({"prompt": "a", "cache": bad}, "completion")


def test_a_cache_hit_is_noted_on_its_choice_streamed_or_not():
    from pdserve.router.responses import Aggregate

    plan = parse({"prompt": "a", "n": 2}, "completion")
    hit = [pb.GenerateResponse(text="x" * 3, token_ids=[1, 2, 3]),
           pb.GenerateResponse(text="y", token_ids=[4], finish_reason="length", cached=True, cache_similarity=0.97)]
    total = Aggregate()
    for r in hit:
        total.add(pb.GenerateResponse.FromString(r.SerializeToString()))  # Aggregate keeps the first message
    miss = pb.GenerateResponse(text="z", finish_reason="length")
    out = full_response(plan, [total.result(), miss], 0)
    assert out["choices"][0]["pdserve_cache"] == {"similarity": 0.97} and "pdserve_cache" not in out["choices"][1]
    chunks = StreamChunks(plan, 0)
    assert "pdserve_cache" not in chunks.chunk(0, hit[0])["choices"][0]
    assert chunks.chunk(0, hit[1])["choices"][0]["pdserve_cache"] == {"similarity": 0.97}


def test_completion_top_logprobs_always_hold_the_sampled_token():
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements"; a token sampled outside the top k was missing from its own top_logprobs."""
    texts = {1: " a", 2: " b", 3: " c", 9: " z"}
    sampled_outside = pb.TokenLogprob(token_id=9, logprob=-7.0, top={1: -0.5, 2: -1.0, 3: -2.0}, token_text=texts)
    greedy = pb.TokenLogprob(token_id=1, logprob=-0.5, top={1: -0.5, 2: -1.0, 3: -2.0}, token_text=texts)
    out, end = completion_logprobs([sampled_outside, greedy], 2, 0)
    assert out["tokens"] == [" z", " a"] and out["text_offset"] == [0, 2] and end == 4
    assert out["top_logprobs"] == [{" a": -0.5, " b": -1.0, " z": -7.0}, {" a": -0.5, " b": -1.0}]
    assert completion_logprobs([sampled_outside], 0, 0)[0]["top_logprobs"] == [{" z": -7.0}]


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"prompt": "x",',
                                 b"\xff\xfe", b""])
def test_a_body_that_is_not_json_is_a_400(raw):
    """A body nested deeper than the JSON parser goes raised RecursionError: a 500."""
    with pytest.raises(GatewayError) as err:
        load_body(raw)
    assert err.value.status == 400 and err.value.param == "body" and err.value.code == "invalid_json"
    assert load_body(b'{"prompt": [[1]]}') == {"prompt": [[1]]}


VLLM_EXTRAS = {  # vLLM's sampling extensions the router has no equivalent for: field -> (a non-default, its default)
    "length_penalty": (0.5, 1.0),
    "use_beam_search": (True, False),
    "skip_special_tokens": (False, True), "spaces_between_special_tokens": (False, True),
    "return_tokens_as_token_ids": (True, False), "truncate_prompt_tokens": (8, None),
    "bad_words": (["x"], []), "add_generation_prompt": (False, True),
    "continue_final_message": (True, False), "chat_template": ("{{ messages }}", None), "priority": (-1, 0),
    "chat_template_kwargs": ({"enable_thinking": False}, {}), "mm_processor_kwargs": ({"fps": 1}, None),
}


def test_logit_bias_and_allowed_token_ids_are_forwarded():
    (req,) = parse({"prompt": "a", "logit_bias": {"50256": -100, "7": 2.5}, "allowed_token_ids": [7, 9]},
                   "completion").requests
    assert dict(req.sampling.logit_bias) == {50256: -100.0, 7: 2.5} and list(req.sampling.allowed_token_ids) == [7, 9]
    for body, param in (({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"1": "high"}}, "logit_bias"),
                        ({"logit_bias": [1]}, "logit_bias"), ({"allowed_token_ids": []}, "allowed_token_ids"),
                        ({"allowed_token_ids": ["a"]}, "allowed_token_ids")):
        with pytest.raises(GatewayError) as err:
            parse({"prompt": "a", **body}, "completion")
        assert err.value.status == 400 and err.value.param == param


def test_penalties_min_p_and_min_tokens_are_forwarded():
    """OpenAI's presence / frequency penalties and vLLM's repetition_penalty, min_p, min_tokens were a 400."""
    sent = {"presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.25, "min_p": 0.125,
            "min_tokens": 3}
    for kind, body in (("completion", {"prompt": "a"}), ("chat", {"messages": [{"role": "user", "content": "x"}]})):
        (req,) = parse({**body, **sent}, kind).requests
        assert {k: getattr(req.sampling, k) for k in sent} == sent
        assert not any(parse(body, kind).requests[0].sampling.HasField(k) for k in sent)  # unset: the router's
        assert parse({**body, "include_stop_str_in_output": True}, kind).requests[0].sampling.include_stop_str_in_output


@pytest.mark.parametrize("field", list(VLLM_EXTRAS))
def test_vllms_unserved_extensions_are_refused_unless_default_not_silently_ignored(field):
    """A vLLM client sending prompt_logprobs or bad_words got a 200 without them."""
    other, default = VLLM_EXTRAS[field]
    messages = [{"role": "user", "content": "x"}]
    for kind, body in (("completion", {"prompt": "a"}), ("chat", {"messages": messages})):
        with pytest.raises(GatewayError) as err:
            parse({**body, field: other}, kind)
        assert err.value.status == 400 and err.value.param == field and "not supported" in err.value.message
        assert len(parse({**body, field: default}, kind).requests) == 1  # the default value is fine


def test_vllms_add_special_tokens_is_refused_where_the_router_would_do_otherwise():
    """A client that renders its own chat template sends add_special_tokens: false to /v1/completions (no second
    BOS); the router tokenizes prompts with them, so that was a silently different prompt."""
    for kind, body, served in (("completion", {"prompt": "a"}, True),
                               ("chat", {"messages": [{"role": "user", "content": "x"}]}, False)):
        with pytest.raises(GatewayError) as err:
            parse({**body, "add_special_tokens": not served}, kind)
        assert err.value.status == 400 and err.value.param == "add_special_tokens"
        assert len(parse({**body, "add_special_tokens": served}, kind).requests) == 1
