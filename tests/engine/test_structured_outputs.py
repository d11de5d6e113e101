"""Structured outputs (engine.structured_outputs, engine.structured): whatever a random-weight model would say, the
text matches the request's JSON schema, regex, choices or grammar; unconstrained rows in the same batch are not
touched; a migrated request continues on its grammar; a bad constraint is refused naming the field.
"""

from __future__ import annotations

import json
import re

import pytest

from pdserve import LLM, SamplingParams, StructuredOutputsParams
from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.structured_outputs import _grammar
from tests.engine.helpers import assert_idle

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "ok", "n", "tags"], "additionalProperties": False}
PROMPTS = ["Hello", "World", [5, 6, 7], "Once upon a time"]


@pytest.fixture(scope="module", params=["off", "on"])
def llm(request):
    return LLM("tiny", num_blocks=128, async_output=request.param)


def _texts(llm, so, **kw):
    params = SamplingParams(max_tokens=96, seed=3, structured_outputs=so, **kw)
    outs = llm.generate(PROMPTS, params)
    assert_idle(llm.engine)
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def test_json_schema_answers_parse_and_follow_the_schema(llm):
    for text, reason in _texts(llm, StructuredOutputsParams(json=SCHEMA)):
        assert reason == "stop", text
        got = json.loads(text)
        assert list(got) == ["name", "ok", "n", "tags"]  # the schema's order
        assert isinstance(got["name"], str) and len(got["name"]) <= 6 and isinstance(got["ok"], bool)
        assert isinstance(got["n"], int) and 0 <= got["n"] <= 99 and set(got["tags"]) <= {"a", "b"}
    for text, reason in _texts(llm, StructuredOutputsParams(json_object=True), temperature=0):
        # a random model may wander in a string until max_tokens; whatever ends is an object
        assert text.startswith("{") and (reason == "length" or isinstance(json.loads(text), dict)), text


def test_regex_choice_and_grammar(llm):
    for text, reason in _texts(llm, StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) and reason == "stop"
    choices = ["yes", "no", "it depends (maybe)"]
    got = {t for t, _ in _texts(llm, StructuredOutputsParams(choice=choices))}
    assert got <= set(choices)
    for text, _ in _texts(llm, StructuredOutputsParams(grammar='root ::= "A" ("B" | "C"){2,4}')):  # GBNF
        assert re.fullmatch(r"A[BC]{2,4}", text), text
    for text, _ in _texts(llm, StructuredOutputsParams(grammar='start: "x" NUMBER\n%import common.NUMBER')):  # Lark
        assert re.fullmatch(r"x[0-9.eE+-]+", text), text


def test_unconstrained_rows_in_the_same_batch_are_untouched(llm):
    free = SamplingParams(max_tokens=12, seed=9, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free)]
    mixed = llm.generate(PROMPTS * 2, [free] * 4 + [SamplingParams(max_tokens=12, seed=9, structured_outputs=
                                                                   StructuredOutputsParams(regex="[a-c]+"))] * 4)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    assert all(re.fullmatch("[a-c]+", o.outputs[0].text) for o in mixed[4:])
    assert alone[0] != [o.outputs[0].token_ids for o in mixed[4:]][0]  # the constraint did change those rows


def _run(llm, rid, tokens, params, sample_offset=0):
    e = llm.engine
    e.add_request(rid, tokens, params, sample_offset=sample_offset)
    ids = []
    while e.has_unfinished():
        for out in e.step():
            ids += out.new_token_ids
    assert_idle(e)
    return ids


def test_a_migrated_request_continues_on_its_grammar(llm):
    params = SamplingParams(max_tokens=96, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    prompt = [3 + (j * 5) % 200 for j in range(20)]
    ids = _run(llm, "whole", prompt, params)
    assert json.loads(llm.engine.tokenizer.decode(ids))
    for k in (1, len(ids) // 2, len(ids) - 1):  # another worker streamed k tokens, then died
        rest = _run(llm, f"m{k}", prompt + ids[:k], SamplingParams(
            max_tokens=96 - k, temperature=0, structured_outputs=params.structured_outputs), sample_offset=k)
        assert ids[:k] + rest == ids, k


def test_bad_constraints_are_refused_naming_the_field_and_the_engine_serves_on(llm):
    for so, field in ((StructuredOutputsParams(regex="a(b"), "structured_outputs.regex"),
                      (StructuredOutputsParams(json={"type": "objectx"}), "structured_outputs.json"),
                      (StructuredOutputsParams(grammar="start: undefined_rule"), "structured_outputs.grammar")):
        with pytest.raises(InvalidRequestError, match=re.escape(field)):
            llm.engine.add_request("bad", "Hello", SamplingParams(structured_outputs=so))
        assert_idle(llm.engine)
    with pytest.raises(InvalidRequestError, match="already generated do not match"):  # a migration off its grammar
        llm.engine.add_request("off", [5, 6, 7, 9], SamplingParams(structured_outputs=StructuredOutputsParams(
            regex="[a-c]+")), sample_offset=2)
    assert_idle(llm.engine)
    for kw, message in ((dict(), "set exactly one of"), (dict(regex="a", choice=["b"]), "got regex, choice"),
                        (dict(choice="ab"), "choice: expected a list"), (dict(choice=[""]), "non-empty string")):
        with pytest.raises(ValueError, match=re.escape(message)):
            StructuredOutputsParams(**kw)
    assert _texts(llm, StructuredOutputsParams(choice=["ok"]))[0] == ("ok", "stop")
    assert _grammar.cache_info().currsize >= 1  # grammars are compiled once per distinct constraint


def test_a_worker_warms_the_grammar_tokenizer_up_off_the_engine_thread(llm, caplog):
    """EngineLoop.start builds llguidance's view of the tokenizer on a thread of its own, so the first constrained
    request does not stall the loop; a tokenizer llguidance cannot read is logged there, not raised."""
    import time

    from pdserve.engine.engine_loop import EngineLoop
    from pdserve.engine.structured import Grammars

    g = llm.engine.grammars
    g._lltok = None
    loop = EngineLoop(llm.engine).start()
    try:
        deadline = time.monotonic() + 30
        while g._lltok is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert g._lltok is not None
    finally:
        loop.stop()
    broken = Grammars(object(), 320, {2})  # not a fast tokenizer
    with caplog.at_level("INFO", logger="pdserve.engine.structured"):
        broken.warm_up()
    assert "not warmed up" in caplog.text and broken._lltok is None
