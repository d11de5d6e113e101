"""Sampling and API features a vLLM or OpenAI user expects, through a real 1+1 cluster and its gateway, against
the offline engine: penalties, stop_reason, structured outputs, echo and prompt logprobs; and that constrained,
penalized streams cancelled midway leak nothing. Prompts longer than --local-prefill-tokens take a remote
prefill, so the first token comes from the prefill worker and the rest from the decode worker."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from pdserve.protos import pdserve_pb2 as pb
from tests.gateway.conftest import grpc_call, wait_load

S = pb.SamplingParams
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _await_idle(cluster, bound_s: float = 5.0) -> pb.WorkerLoad:
    return wait_load(cluster, lambda load: not load.num_running and load.num_free_blocks == load.num_total_blocks,
                     bound_s)


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
