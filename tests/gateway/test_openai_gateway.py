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


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.gateway_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


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


def test_penalties_cross_the_prefill_decode_split_as_offline(client, model):
    """presence / frequency / repetition penalties and min_tokens were a 400. Through the cluster (the first token
    sampled on the prefill worker, the rest on the decode worker) the answer equals the offline engine's."""
    from pdserve import LLM, SamplingParams

    pen = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.25, "min_tokens": 6}
    prompt = "A penalized tale of the sea, never asked before"  # over --local-prefill-tokens: a remote prefill
    got = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"return_token_ids": True, **pen})
    llm = LLM(model=model, num_blocks=64)
    (want,) = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0, **pen))
    (plain,) = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0))
    assert got.choices[0].token_ids == list(want.outputs[0].token_ids) != list(plain.outputs[0].token_ids)
    assert got.choices[0].text == want.outputs[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="a", max_tokens=3, presence_penalty=2.5)
    assert e.value.body["param"] == "presence_penalty" and "[-2, 2]" in e.value.body["message"]


def test_stop_reason_names_the_stop_string_or_token_as_vllms_server_does(cluster, client, model):
    """vLLM's ``stop_reason`` on every choice: the stop string or stop token id that ended it, else null (it was
    missing, so a vLLM client could not tell which of its stops fired)."""
    base = dict(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    whole = client.completions.create(**base, extra_body={"return_token_ids": True, "ignore_eos": True})
    ids, text = whole.choices[0].token_ids, whole.choices[0].text
    assert whole.choices[0].model_extra["stop_reason"] is None  # length
    stop_id = next(t for t in ids[2:] if t not in ids[:2])
    out = client.completions.create(**base, extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert (out.choices[0].finish_reason, out.choices[0].model_extra["stop_reason"]) == ("stop", stop_id)
    stop = text[3:5]
    assert stop.strip() and text.find(stop) == 3
    for stream in (False, True):
        got = client.completions.create(**base, stop=[stop, "never-seen"], stream=stream,
                                        extra_body={"ignore_eos": True})
        last = list(got)[-1] if stream else got
        assert (last.choices[0].finish_reason, last.choices[0].model_extra["stop_reason"]) == ("stop", stop)
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert "stop_reason" in chat.choices[0].model_extra and chat.choices[0].model_extra["stop_reason"] is None
    req = pb.GenerateRequest(prompt="Once upon a time", sampling=S(max_tokens=12, temperature=0, ignore_eos=True,
                                                                    stop_token_ids=[stop_id]))
    resp = grpc_call(cluster.router_address, "Complete", req)
    assert (resp.stop_token_id, resp.stop_string) == (stop_id, "")


def test_structured_outputs_across_the_prefill_decode_split(cluster, client, model):
    """response_format json_schema, guided_choice and a streamed regex through a 1+1 cluster (the first token
    constrained on the prefill worker, the rest on the decode worker): the text matches, and equals the offline
    engine's for the same seed (they were refused with a 400)."""
    import re

    from pdserve import LLM, SamplingParams, StructuredOutputsParams

    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["colour", "n"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Describe one colour as JSON, with a small number too."}]  # not cached:
    out = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, seed=5, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})  # a remote prefill
    got = json.loads(out.choices[0].message.content)
    assert got["colour"] in ("red", "green", "blue") and 1 <= got["n"] <= 9 and out.choices[0].finish_reason == "stop"
    llm = LLM(model=model, num_blocks=64)
    constrained = SamplingParams(max_tokens=40, seed=5, structured_outputs=StructuredOutputsParams(json=schema))
    (want,) = llm.chat([msgs], constrained)
    assert out.choices[0].message.content == want.outputs[0].text
    prompt = "A story, told as JSON, about a lighthouse keeper"
    resp = grpc_call(cluster.router_address, "Complete", pb.GenerateRequest(prompt=prompt, sampling=S(
        max_tokens=40, seed=5, structured_outputs=pb.StructuredOutputs(json=json.dumps(schema)))))
    assert resp.prefill_worker and resp.text == llm.generate(prompt, constrained)[0].outputs[0].text
    choice = client.completions.create(model=model, prompt="Pick:", max_tokens=8, seed=1,
                                       extra_body={"guided_choice": ["alpha", "beta", "gamma delta"]})
    assert choice.choices[0].text in ("alpha", "beta", "gamma delta")
    chunks = list(client.completions.create(model=model, prompt="Code:", max_tokens=12, seed=2, stream=True,
                                            extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}}))
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", "".join(c.choices[0].text for c in chunks))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="a", max_tokens=3, extra_body={"guided_regex": "a("})
    assert "structured_outputs.regex" in e.value.body["message"]


def test_echo_with_max_tokens_0_scores_the_prompt_as_offline_prompt_logprobs(client, model):
    """lm-evaluation-harness's local-completions asks {echo, logprobs, max_tokens: 0} to score a text: the answer is
    the prompt, each token but the first with its logprob, equal to the offline engine's prompt_logprobs (echo and
    prompt_logprobs were a 400)."""
    from pdserve import LLM, SamplingParams

    text = "In the beginning God created the heaven and the earth."  # over --local-prefill-tokens
    out = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    (choice,) = out.choices
    assert choice.text == text and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and None not in lp.token_logprobs[1:]
    (want,) = LLM(model=model, num_blocks=64).generate(text, SamplingParams(max_tokens=1, prompt_logprobs=1))
    assert len(lp.tokens) == len(want.prompt_token_ids) == out.usage.prompt_tokens
    for got, entry, token in zip(lp.token_logprobs[1:], want.prompt_logprobs[1:], want.prompt_token_ids[1:],
                                 strict=True):
        assert got == pytest.approx(entry[token].logprob, abs=1e-4)
    listed = client.completions.create(model=model, prompt=text, max_tokens=2, temperature=0,
                                       extra_body={"prompt_logprobs": 0})
    plp = listed.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(want.prompt_token_ids)
    token = str(want.prompt_token_ids[1])
    assert plp[1][token]["logprob"] == pytest.approx(want.prompt_logprobs[1][int(token)].logprob, abs=1e-4)
    assert plp[1][token]["rank"] == want.prompt_logprobs[1][int(token)].rank


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


def test_constrained_and_penalized_streams_cancelled_midway_leak_nothing(cluster, model):
    """24 concurrent streams with a grammar, penalties, logit_bias or prompt logprobs (each carries per-request
    state on the workers: a matcher, a cached prompt), half dropped after their first chunk: the others answer
    right and no block stays held. Every kind has streams dropped and streams finished (i % 3, i % 4)."""
    import re

    async def go():
        aclient = openai.AsyncOpenAI(base_url=cluster.gateway_url, api_key="unused", max_retries=0, timeout=60)
        extras = [{"guided_regex": "[a-z]{2,8}"}, {"guided_choice": ["yea", "nay"], "presence_penalty": 1.0},
                  {"logit_bias": {"5": 2.0}, "frequency_penalty": 0.5}, {"prompt_logprobs": 1, "min_tokens": 2}]

        async def one(i):
            stream = await aclient.completions.create(model=model, prompt=f"Request number {i} of many", seed=i,
                                                      max_tokens=24, stream=True, extra_body=extras[i % 4])
            if i % 3 == 1:
                async for _ in stream:
                    break
                await stream.close()
                return None
            return i, "".join([c.choices[0].text async for c in stream if c.choices])

        done = [r for r in await asyncio.gather(*(one(i) for i in range(24))) if r is not None]
        await aclient.close()
        return done

    done = asyncio.run(go())
    assert len(done) == 16
    for i, text in done:
        assert i % 4 != 0 or re.fullmatch("[a-z]{2,8}", text), text
        assert i % 4 != 1 or text in ("yea", "nay"), text
    load = _await_idle(cluster, 10.0)
    assert not load.num_running and load.num_free_blocks == load.num_total_blocks
