"""Completions' echo and vLLM's prompt_logprobs in the gateway, from the router's prompt logprobs (both were a
400): the prompt before the text and its tokens before the completion's in the logprobs object, the prompt alone
with max_tokens 0 (how lm-evaluation-harness scores a text), and vLLM's prompt_logprobs list."""

from __future__ import annotations

import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.gateway.openai_request import parse
from pdserve.router.gateway.openai_response import StreamChunks, full_response

TEXTS = {5: "He", 6: "llo", 7: " there", 9: "!", 11: "x"}


def _entry(token_id: int, logprob: float = 0.0, rank: int = 0, top=()) -> pb.PromptLogprob:
    e = pb.PromptLogprob(token_id=token_id, logprob=logprob, rank=rank, top_ids=[t for t, _ in top],
                         top_logprobs=[v for _, v in top])
    for t in (token_id, *e.top_ids):
        e.token_text[t] = TEXTS[t]
    return e


def _answer() -> pb.GenerateResponse:
    r = pb.GenerateResponse(token_ids=[9], text="!", finish_reason="length")
    r.prompt_logprobs.extend([_entry(5), _entry(6, -1.5, 2, [(11, -0.5), (6, -1.5)]), _entry(7, -0.25, 1, [(7, -0.25)])])
    lp = r.logprobs.add(token_id=9, logprob=-2.0)
    lp.token_text[9] = "!"
    r.usage.prompt_tokens, r.usage.completion_tokens = 3, 1
    return r


def test_echo_asks_the_router_for_the_prompt_and_max_tokens_0_scores_it_alone():
    plan = parse({"prompt": "Hello there", "echo": True, "logprobs": 1, "max_tokens": 0}, "completion")
    (req,) = plan.requests
    assert (req.sampling.prompt_logprobs, req.sampling.max_tokens, plan.drop_generated) == (1, 1, True)
    plan = parse({"prompt": [5, 6], "echo": True}, "completion")
    assert plan.requests[0].sampling.prompt_logprobs == 0 and not plan.drop_generated
    plan = parse({"prompt": "a", "prompt_logprobs": 2}, "completion")
    assert plan.requests[0].sampling.prompt_logprobs == 2 and not plan.echo


def test_an_echoed_answer_puts_the_prompt_first():
    plan = parse({"prompt": "Hello there", "echo": True, "logprobs": 1, "max_tokens": 1}, "completion")
    (choice,) = full_response(plan, [_answer()], 0)["choices"]
    assert choice["text"] == "Hello there!"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["He", "llo", " there", "!"]
    assert lp["token_logprobs"] == [None, -1.5, -0.25, -2.0]
    assert lp["top_logprobs"] == [None, {"x": -0.5, "llo": -1.5}, {" there": -0.25}, {"!": -2.0}]
    assert lp["text_offset"] == [0, 2, 5, 11]


def test_max_tokens_0_answers_the_prompt_alone_and_counts_no_completion_token():
    plan = parse({"prompt": [5, 6, 7], "echo": True, "logprobs": 0, "max_tokens": 0}, "completion")
    out = full_response(plan, [_answer()], 0)
    (choice,) = out["choices"]
    assert choice["text"] == "Hello there" and choice["finish_reason"] == "length"  # a token prompt: its texts
    assert choice["logprobs"]["token_logprobs"] == [None, -1.5, -0.25]
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == 3
    chunks = StreamChunks(plan, 0)
    first = chunks.chunk(0, _answer())["choices"][0]
    assert first["text"] == "Hello there" and first["logprobs"]["tokens"] == ["He", "llo", " there"]


def test_vllms_prompt_logprobs_list():
    plan = parse({"prompt": "Hello there", "prompt_logprobs": 1}, "completion")
    (choice,) = full_response(plan, [_answer()], 0)["choices"]
    assert choice["text"] == "!"  # no echo
    assert choice["prompt_logprobs"] == [
        None,
        {"6": {"logprob": -1.5, "rank": 2, "decoded_token": "llo"},
         "11": {"logprob": -0.5, "rank": 1, "decoded_token": "x"}},
        {"7": {"logprob": -0.25, "rank": 1, "decoded_token": " there"}},
    ]
    streamed = StreamChunks(plan, 0)
    assert streamed.chunk(0, _answer())["choices"][0]["prompt_logprobs"] == choice["prompt_logprobs"]
    assert "prompt_logprobs" not in streamed.chunk(0, _answer())["choices"][0]  # the first chunk only


@pytest.mark.parametrize("body", [{"messages": [{"role": "user", "content": "x"}], "echo": True}])
def test_echo_is_for_completions(body):
    from pdserve.router.gateway.errors import GatewayError

    with pytest.raises(GatewayError) as err:
        parse(body, "chat")
    assert err.value.param == "echo"
