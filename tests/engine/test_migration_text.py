"""A migrated request (the router re-prefills prompt + the tokens it already sent on another worker, with
``sample_offset`` = how many) must stream the text the first worker still held back: the bytes of an unfinished
multi-byte character and text that might start a stop string. A fresh detokenizer took the sent tokens as prompt,
so that text was lost (the client's text lacked a character) and a stop string spanning the cut never matched.
"""

from __future__ import annotations

import dataclasses

import pytest

from pdserve import LLM, SamplingParams
from tests.engine.helpers import assert_idle

PROMPT = [3 + (j * 11) % 250 for j in range(40)]
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=["off", "on"])
def llm(request):
    return LLM("tiny", num_blocks=128, async_output=request.param)


def _run(llm: LLM, rid: str, tokens: list[int], params: SamplingParams, sample_offset: int = 0):
    """(token ids, text deltas per output, finish reason) of one request stepped to its end."""
    e = llm.engine
    e.add_request(rid, tokens, params, sample_offset=sample_offset)
    ids, deltas, reason = [], [], None
    while e.has_unfinished():
        for out in e.step():
            assert out.request_id == rid
            ids += out.new_token_ids
            deltas += [out.text_delta] + [""] * (len(out.new_token_ids) - 1)
            reason = out.finish_reason if out.finished else reason
    assert_idle(e)
    return ids, deltas, reason


def _migrated(llm, params, ids, deltas, k):
    """(ids, text, finish reason) a client sees when its worker dies after sending ``k`` tokens and the router
    migrates the rest (prompt + those tokens, ``sample_offset`` k)."""
    rest = dataclasses.replace(params, max_tokens=params.max_tokens - k)
    more_ids, more_deltas, reason = _run(llm, f"m{k}", PROMPT + ids[:k], rest, sample_offset=k)
    return ids[:k] + more_ids, "".join(deltas[:k]) + "".join(more_deltas), reason


def test_a_migration_streams_the_text_the_first_worker_held_back(llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    ids, deltas, _ = _run(llm, "whole", PROMPT, params)
    full = "".join(deltas)
    assert any(d == "" for d in deltas[:-1]), "the workload has cuts where text is held back (an unfinished character)"
    for k in range(1, MAX_TOKENS):
        got_ids, got_text, _ = _migrated(llm, params, ids, deltas, k)
        assert got_ids == ids
        assert got_text == full, (k, got_text, full)


def test_a_stop_string_that_spans_the_cut_still_ends_the_request(llm):
    ids, deltas, _ = _run(llm, "whole", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    full = "".join(deltas)
    ends = [len("".join(deltas[:k])) for k in range(MAX_TOKENS + 1)]
    # a stop string made of one token's text and the first character of the next one's
    t = next(t for t in range(2, MAX_TOKENS - 2) if ends[t + 1] > ends[t] and ends[t + 2] > ends[t + 1])
    stop = full[ends[t] : ends[t + 1] + 1]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, stop=[stop])
    want_ids, want_deltas, want_reason = _run(llm, "stopped", PROMPT, params)
    want_text = full[: full.find(stop)]
    assert "".join(want_deltas) == want_text and want_reason.value == "stop"
    held = [k for k in range(1, len(want_ids)) if len("".join(want_deltas[:k])) < ends[k]]
    assert held, "some cut falls where the first worker held text back (it might start the stop string)"
    for k in range(1, len(want_ids)):
        assert _migrated(llm, params, want_ids, want_deltas, k) == (want_ids, want_text, want_reason), k
