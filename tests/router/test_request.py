"""Parsing at the router's edge: a GenerateRequest becomes a frozen ClientRequest once, or an
InvalidRequestError (a ValueError) naming the bad field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.load import WorkerLoad
from pdserve.router.request import MAX_REQUEST_ID_LEN, ClientRequest, RequestParser, check_model_limits

S = pb.SamplingParams


class Tok:
    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text.strip()]


def parse(**fields) -> ClientRequest:
    return RequestParser(Tok(), seed=0).parse(pb.GenerateRequest(**fields))


def test_a_request_is_parsed_into_a_frozen_domain_request():
    req = parse(request_id="r1", prompt="hi", sampling=S(max_tokens=3, temperature=0, seed=5), priority=2,
                tenant="t", session_id="s")
    assert req.cluster_id.startswith("r1~") and len(req.cluster_id) == len("r1~") + 12  # the router's own id
    req = dataclasses.replace(req, cluster_id="")
    assert req == ClientRequest("r1", (104, 105), SamplingParams(max_tokens=3, temperature=0.0, seed=5), 2, "t", "s")
    assert req.session_key == "s" and parse(token_ids=[1], tenant="t").session_key == "t"
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.priority = 0
    assert parse(token_ids=[4, 5]).token_ids == (4, 5)
    assert parse(token_ids=[4]).sampling == SamplingParams()  # the proto's defaults


BAD = {
    "empty prompt": (dict(prompt=""), "prompt"),
    "both": (dict(prompt="hi", token_ids=[1]), "prompt"),
    "blank prompt": (dict(prompt="   "), "prompt: tokenizes to no tokens"),
    "long request id": (dict(request_id="x" * (MAX_REQUEST_ID_LEN + 1), token_ids=[1]), "request_id"),
    "max_tokens": (dict(token_ids=[1], sampling=S(max_tokens=0)), "max_tokens"),
    "temperature nan": (dict(token_ids=[1], sampling=S(temperature=math.nan)), "temperature"),
    "top_p": (dict(token_ids=[1], sampling=S(top_p=1.5)), "top_p"),
    "top_k": (dict(token_ids=[1], sampling=S(top_k=-2)), "top_k"),
    "logprobs": (dict(token_ids=[1], sampling=S(logprobs=21)), "logprobs"),
    "stop": (dict(token_ids=[1], sampling=S(stop=["s"] * 17)), "stop"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_an_invalid_request_naming_the_field(case):
    fields, message = BAD[case]
    with pytest.raises(InvalidRequestError, match=message) as err:
        parse(**fields)
    assert isinstance(err.value, ValueError)


def test_model_limits_are_those_of_the_given_worker_and_skipped_until_known():
    load = WorkerLoad(vocab_size=100, max_model_len=4)
    check_model_limits([0, 99, 5], load)
    check_model_limits([10_000] * 50, WorkerLoad())
    with pytest.raises(InvalidRequestError, match=r"token_ids: 100 is outside the vocabulary \[0, 100\)"):
        check_model_limits([1, 100], load)
    with pytest.raises(InvalidRequestError, match="token_ids: -3"):
        check_model_limits([-3], load)
    with pytest.raises(InvalidRequestError, match="prompt: 4 tokens exceeds the context limit of 3"):
        check_model_limits([1, 2, 3, 4], load)
