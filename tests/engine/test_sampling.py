"""Sampling: seeds independent of the batch, top-k/top-p limits, stops, logprobs, StopChecker."""

from __future__ import annotations

from engine import SamplingParams
from engine.stops import StopChecker

P = [[10, 20, 30, 40, 50], [60, 61, 62], [70] * 33, [99, 98]]


def toks(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompts, params)]


def test_seed_is_reproducible_whatever_the_batch(tiny_llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    alone = toks(tiny_llm, [P[0]], sp)[0]
    mixed = tiny_llm.generate(
        [P[1], P[0], P[2]],
        [SamplingParams(max_tokens=5, temperature=0.7), sp, SamplingParams(max_tokens=20, temperature=1.3)],
    )
    assert mixed[1].token_ids == alone
    other = toks(tiny_llm, [P[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=43, ignore_eos=True))[0]
    assert other != alone


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_llm):
    greedy = toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True)) == greedy
    assert toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, ignore_eos=True)) == greedy
    hot = toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=2.0, seed=1, ignore_eos=True))
    assert hot != greedy


def test_stop_token_ids_ignore_eos_and_length(tiny_llm):
    greedy = tiny_llm.generate([P[0]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    target = greedy.token_ids[3]
    out = tiny_llm.generate([P[0]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(target,)))[0]
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(target) + 1]
    assert out.finish_reason == "stop"
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 10


def test_eos_stops_unless_ignored(tiny_llm):
    eos = tiny_llm.engine.eos_token_ids
    assert 2 in eos
    # find a prompt whose greedy continuation hits eos within a few tokens, if the random model has one
    for start in range(3, 250, 7):
        o = tiny_llm.generate([[start, start + 1]], SamplingParams(max_tokens=30, temperature=0))[0]
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in eos
            ig = tiny_llm.generate([[start, start + 1]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
            assert len(ig.token_ids) == 30 and ig.token_ids[: len(o.token_ids)] == o.token_ids
            return
    raise AssertionError("no prompt reached eos; pick another search range")


def test_stop_strings_cut_the_text(tiny_llm):
    base = tiny_llm.generate(["Hello world"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = base.text
    printable = [i for i in range(2, len(text) - 2) if text[i].isprintable() and text[i] != "\ufffd"]
    assert printable, f"need some printable output, got {text!r}"
    i = printable[len(printable) // 2]
    stop = text[i : i + 2]
    out = tiny_llm.generate(["Hello world"], SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert stop not in out.text


def test_logprobs(tiny_llm):
    o = tiny_llm.generate([P[1]], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(o.logprobs) == 5
    for tok, lp in zip(o.token_ids, o.logprobs, strict=True):
        assert tok in lp and all(v <= 0 for v in lp.values())
        assert 3 <= len(lp) <= 4
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token


def test_stop_checker_split_across_deltas_and_holdback():
    sc = StopChecker(("STOP",))
    assert sc.push("abc ST") == "abc "  # "ST" may begin the stop string: held back
    assert sc.push("O") == ""
    assert sc.push("P tail") == "" and sc.hit
    assert sc.text == "abc " and sc.flush() == ""
    sc2 = StopChecker(("xyz",))
    assert sc2.push("ab x") == "ab "
    assert sc2.push("y!") == "xy!"  # not a stop after all: released
    assert sc2.flush() == "" and not sc2.hit
    assert StopChecker(()).push("anything") == "anything"
