"""The official ``openai`` client against a real cluster's gateway: completions and chat, streamed and not,
n > 1, logprobs, token parity with the gRPC API, errors in OpenAI's JSON, models, health, metrics, and a
client that disconnects freeing the decode worker's KV blocks."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest

from pdserve.protos import pdserve_pb2 as pb
from tests.gateway.conftest import decode_load, grpc_call, wait_load

S = pb.SamplingParams
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_models_lists_the_served_model(cluster, client):
    models = client.models.list().data
    assert [m.id for m in models] == [cluster.model] and models[0].owned_by == "pdserve"
    one = client.models.retrieve(cluster.model)  # GET /v1/models/{id}, as OpenAI's API has it
    assert (one.id, one.object, one.owned_by) == (cluster.model, "model", "pdserve")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no/such-model")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


def test_completion_and_token_parity_with_grpc(cluster, client, model):
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert out.object == "text_completion" and len(out.choices) == 1
    choice = out.choices[0]
    want = grpc_call(cluster.router_address, "Complete",
                     pb.GenerateRequest(prompt="Once upon a time", sampling=S(max_tokens=8, temperature=0)))
    assert choice.token_ids == list(want.token_ids) and choice.text == want.text
    assert choice.finish_reason == want.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (want.usage.prompt_tokens, 8)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_prompt_forms_and_n(client, model):
    ids = [5, 6, 7, 8]
    for prompt, num_prompts in (("a", 1), (["a", "bb"], 2), (ids, 1), ([ids, ids[:2]], 2)):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=3, n=2, seed=7)
        assert [c.index for c in out.choices] == list(range(2 * num_prompts))
        assert out.usage.completion_tokens == sum(3 for _ in out.choices)
    again = client.completions.create(model=model, prompt="a", max_tokens=3, n=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in
                                               client.completions.create(model=model, prompt="a", max_tokens=3,
                                                                         n=2, seed=7).choices]


def test_a_request_with_more_choices_than_the_router_admits_at_once_is_served_whole(client, model):
    """192 choices (3 prompts x n=64) on an idle 1+1 cluster: the gateway runs 32 router calls at a time, so the
    router's per-worker admission bound (128) never refuses a lone request (it was a 429 that no retry could
    pass), streamed or not."""
    prompts = ["And"] * 3
    out = client.completions.create(model=model, prompt=prompts, n=64, max_tokens=2, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == list(range(192)) and out.usage.completion_tokens == 2 * 192
    chunks = list(client.completions.create(model=model, prompt=prompts, n=64, max_tokens=2, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert sorted({c.choices[0].index for c in chunks if c.choices}) == list(range(192))
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 192


def test_chat_and_token_parity_with_grpc(cluster, client, model):
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                         extra_body={"return_token_ids": True})
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant"
    req = pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in CHAT], sampling=S(max_tokens=6, temperature=0))
    want = grpc_call(cluster.router_address, "Complete", req)
    assert out.choices[0].token_ids == list(want.token_ids) and msg.content == want.text
    assert out.usage.prompt_tokens == want.usage.prompt_tokens > 10  # the template's tokens, not just the text


def test_streaming_with_usage_matches_the_unstreamed_answer(client, model):
    whole = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    plain = list(client.completions.create(model=model, prompt="Hello", max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless asked


def test_chat_streaming_n_and_usage(client, model):
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    roles = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        roles.setdefault(choice.index, choice.delta.role)
        texts[choice.index] += choice.delta.content or ""
    assert roles == {0: "assistant", 1: "assistant"}
    assert texts == {0: whole.choices[0].message.content, 1: whole.choices[0].message.content}  # greedy
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # the prompt counted once


def test_logprobs(client, model):
    out = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(value)  # greedy: the best
        assert token in top
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(bytes(c.bytes).decode() == c.token for c in content)
    streamed = list(client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=1,
                                              stream=True))
    offsets = [o for c in streamed for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=2), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(logprobs=50), "logprobs"),
    (dict(extra_body={"stop": 5}), "stop"),
    (dict(extra_body={"echo": "yes"}), "echo"),
    (dict(extra_body={"prompt": [[5, "x"]]}), "prompt"),
], ids=["temperature", "top_p", "max_tokens", "n", "logprobs", "stop", "echo", "prompt"])
def test_a_bad_field_is_400_with_openai_error_json(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", **kwargs)
    assert err.value.status_code == 400
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert body["param"] == param and body["message"].startswith(param)


def test_chat_errors(client, model):
    with pytest.raises(openai.BadRequestError, match="messages\\[1\\].role: 'robot' is not one of"):
        client.chat.completions.create(model=model, messages=[CHAT[1], {"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="messages: expected a non-empty list"):
        client.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.BadRequestError, match="top_logprobs: needs logprobs"):
        client.chat.completions.create(model=model, messages=CHAT, top_logprobs=2)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):  # streamed too: a plain 404, not an error inside a 200 stream
        list(client.completions.create(model="gpt-4o", prompt="hi", stream=True))


def _http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_raw_http_errors_health_and_metrics(cluster):
    base = cluster.gateway_url
    status, _, body = _http(base + "/completions", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["param"] == "body"
    status, _, body = _http(base + "/nope")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = _http(base[: -len("/v1")] + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = _http(base[: -len("/v1")] + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b'pdserve_gateway_requests_total{endpoint="/v1/completions",status="200"}' in body


def _stream_then_drop(url: str, body: dict, cluster, events: int = 3) -> pb.WorkerLoad:
    async def go():
        async with aiohttp.ClientSession() as s:
            resp = await s.post(url, json=body)
            assert resp.status == 200, await resp.text()
            seen = 0
            async for line in resp.content:
                seen += line.startswith(b"data: {")
                if seen >= events:
                    break
            busy = await asyncio.to_thread(wait_load, cluster, lambda load: load.num_running == 1)
            resp.close()  # drops the connection mid-stream
            return busy

    return asyncio.run(go())


def _await_idle(cluster, bound_s: float = 5.0) -> pb.WorkerLoad:
    """Within the bound (the router polls loads every ~0.5 s): nothing running, every block free."""
    return wait_load(cluster, lambda load: not load.num_running and load.num_free_blocks == load.num_total_blocks,
                     bound_s)


def test_a_disconnect_mid_stream_frees_the_decode_blocks(cluster, model):
    before = decode_load(cluster).num_aborted
    body = {"model": model, "prompt": "x" * 40, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    busy = _stream_then_drop(cluster.gateway_url + "/completions", body, cluster)
    assert busy.num_running == 1 and busy.num_free_blocks < busy.num_total_blocks
    idle = _await_idle(cluster)
    assert idle.num_running == 0 and idle.num_reserved == 0, "decode still runs the dropped request"
    assert idle.num_free_blocks == idle.num_total_blocks, "decode blocks not freed after the disconnect"
    assert idle.num_aborted > before


def test_a_client_that_gives_up_on_an_unstreamed_answer_frees_the_blocks_too(cluster, model):
    before = decode_load(cluster).num_aborted
    body = {"model": model, "messages": CHAT, "max_tokens": 1900, "ignore_eos": True}

    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s:
            with pytest.raises(TimeoutError):
                await s.post(cluster.gateway_url + "/chat/completions", json=body)

    asyncio.run(go())
    idle = _await_idle(cluster)
    assert idle.num_running == 0 and idle.num_free_blocks == idle.num_total_blocks
    assert idle.num_aborted > before


def test_grpc_chat_messages_and_bad_role(cluster):
    """Chat on the gRPC API itself: messages -> text; a bad role or a wrong model is refused, saying so."""
    import grpc

    msgs = [pb.ChatMessage(role="user", content="Hello")]
    out = grpc_call(cluster.router_address, "Generate",
                    pb.GenerateRequest(messages=msgs, sampling=S(max_tokens=4, temperature=0)))
    assert sum(len(r.token_ids) for r in out) == 4 and out[-1].finish_reason == "length"
    assert "".join(r.text for r in out)
    for req, code, words in (
        (pb.GenerateRequest(messages=[pb.ChatMessage(role="wizard", content="x")]), grpc.StatusCode.INVALID_ARGUMENT,
         "messages[0].role: 'wizard' is not one of system, user, assistant, tool"),
        (pb.GenerateRequest(prompt="hi", messages=msgs), grpc.StatusCode.INVALID_ARGUMENT, "prompt and messages"),
        (pb.GenerateRequest(messages=msgs, model="other"), grpc.StatusCode.NOT_FOUND, "model: 'other'"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            grpc_call(cluster.router_address, "Complete", req)
        assert err.value.code() == code and words in err.value.details()
    models = grpc_call(cluster.router_address, "Models", pb.ModelsRequest()).models
    assert [(m.id, m.chat, m.max_model_len) for m in models] == [(cluster.model, True, 2048)]


def test_every_chunk_of_a_stream_without_a_model_names_the_served_model(cluster, model):
    """``model`` left out: every chunk names the default model, as the unstreamed answer does (the chunks said
    "model": "" until the last one). ``ignore_eos``: a sampled EOS as the first token would end the stream in one
    chunk (a CI flake)."""
    for path, body in [("/completions", {"prompt": "Hello"}),
                       ("/chat/completions", {"messages": CHAT})]:
        req = urllib.request.Request(cluster.gateway_url + path, headers={"Content-Type": "application/json"},
                                     data=json.dumps({**body, "max_tokens": 4, "stream": True,
                                                      "ignore_eos": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            events = [line[6:] for line in r.read().decode().split("\n\n") if line.startswith("data: {")]
        assert len(events) >= 2 and all(json.loads(e)["model"] == model for e in events), events
