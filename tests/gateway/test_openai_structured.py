"""Every HTTP spelling of structured outputs becomes the router's ``StructuredOutputs``; conflicting or misshapen
ones are a 400 naming the field (they were refused outright, or a non-text response_format was)."""

from __future__ import annotations

import json

import pytest

from pdserve.engine.errors import InvalidRequestError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.gateway.errors import GatewayError
from pdserve.router.gateway.openai_request import parse
from pdserve.router.request import RequestParser

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
CHAT = {"messages": [{"role": "user", "content": "x"}]}


def _constraint(body: dict, kind: str = "chat") -> pb.StructuredOutputs | None:
    (req,) = parse({**(CHAT if kind == "chat" else {"prompt": "a"}), **body}, kind).requests
    return req.sampling.structured_outputs if req.sampling.HasField("structured_outputs") else None


@pytest.mark.parametrize("body, want", [
    ({"response_format": {"type": "json_object"}}, pb.StructuredOutputs(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     pb.StructuredOutputs(json=json.dumps(SCHEMA))),
    ({"guided_json": SCHEMA}, pb.StructuredOutputs(json=json.dumps(SCHEMA))),
    ({"guided_json": json.dumps(SCHEMA)}, pb.StructuredOutputs(json=json.dumps(SCHEMA))),
    ({"guided_regex": "[a-z]+"}, pb.StructuredOutputs(regex="[a-z]+")),
    ({"guided_choice": ["yes", "no"]}, pb.StructuredOutputs(choice=pb.Choices(values=["yes", "no"]))),
    ({"guided_grammar": 'root ::= "a"'}, pb.StructuredOutputs(grammar='root ::= "a"')),
    ({"structured_outputs": {"choice": ["x"]}}, pb.StructuredOutputs(choice=pb.Choices(values=["x"]))),
    ({"structured_outputs": {"json": SCHEMA, "regex": None}}, pb.StructuredOutputs(json=json.dumps(SCHEMA))),
    ({"structured_outputs": {"json_object": True}}, pb.StructuredOutputs(json_object=True)),
])
def test_each_spelling_becomes_the_routers_constraint(body, want):
    for kind in ("chat", "completion"):
        assert _constraint(body, kind) == want


def test_free_text_carries_no_constraint():
    assert _constraint({}) is None and _constraint({"response_format": {"type": "text"}}) is None


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_json": SCHEMA, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format.json_schema"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_json": 5}, "guided_json"),
    ({"guided_regex": ["a"]}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": []}, "structured_outputs"),
])
def test_conflicting_or_misshapen_constraints_are_a_400_naming_the_field(body, param):
    with pytest.raises(GatewayError) as err:
        _constraint(body)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("so, field", [
    (pb.StructuredOutputs(regex="a("), "structured_outputs.regex"),
    (pb.StructuredOutputs(json='{"type": "objectx"}'), "structured_outputs.json"),
    (pb.StructuredOutputs(json="[1, 2"), "structured_outputs.json"),
    (pb.StructuredOutputs(grammar="start: nothing_defined"), "structured_outputs.grammar"),
    (pb.StructuredOutputs(choice=pb.Choices(values=[])), "structured_outputs.choice"),
    (pb.StructuredOutputs(choice=pb.Choices(values=["x"] * 257)), "structured_outputs.choice"),
    (pb.StructuredOutputs(regex="a" * 70000), "structured_outputs.regex"),
    (pb.StructuredOutputs(), "structured_outputs"),
])
def test_the_router_refuses_a_bad_constraint_before_routing(so, field):
    parser = RequestParser(tokenizer=None)
    with pytest.raises(InvalidRequestError, match=field.replace(".", r"\.")):
        parser.check_sizes(pb.GenerateRequest(sampling=pb.SamplingParams(structured_outputs=so)))
        parser.sampling(pb.SamplingParams(structured_outputs=so))
