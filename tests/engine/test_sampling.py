"""Sampling: seeds independent of the batch, top-k/top-p supports, temperature, stops, logprobs, StopChecker."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve import LLM, SamplingParams
from pdserve.engine.models import resolve_model
from pdserve.engine.sampler import Sampler, _filter
from pdserve.engine.sequence import Sequence
from pdserve.engine.stops import StopChecker
from pdserve.engine.tokenizer import IncrementalDetokenizer, load_tokenizer
from tests.engine.helpers import assert_idle, hf_model

P = [[10, 20, 30, 40, 50], [60, 61, 62], [70] * 33, [99, 98], list(range(100, 180))]


def toks(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompts, params)]


def seq_with(params: SamplingParams, num_out: int = 0) -> Sequence:
    s = Sequence("s", [5], params)
    s.output_token_ids = [9] * num_out
    return s


# ---- the sampler on synthetic logits --------------------------------------------------------------------
def support(row: torch.Tensor) -> list[int]:
    return torch.isfinite(row).nonzero().flatten().tolist()


def test_filter_top_k_and_top_p_supports():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert support(_filter(logits, 0, 1.0)) == [0, 1, 2, 3]
    assert support(_filter(logits, 2, 1.0)) == [0, 1]
    assert support(_filter(logits, 1, 1.0)) == [0]
    assert support(_filter(logits, 4, 1.0)) == [0, 1, 2, 3]
    assert support(_filter(logits, -1, 1.0)) == [0, 1, 2, 3]
    # top_p keeps the smallest prefix (by probability) whose mass reaches top_p
    assert support(_filter(logits, 0, 0.4)) == [0]
    assert support(_filter(logits, 0, 0.75)) == [0, 1]
    assert support(_filter(logits, 0, 0.85)) == [0, 1, 2]
    assert support(_filter(logits, 0, 0.99)) == [0, 1, 2, 3]
    shuffled = logits[[2, 0, 3, 1]]  # positions do not matter, only the ranking
    assert support(_filter(shuffled, 0, 0.75)) == [1, 3]
    # top-k first, then top-p over the renormalised rest: 0.5/0.95, 0.3/0.95 = 0.84 cumulative < 0.9
    assert support(_filter(logits, 3, 0.9)) == [0, 1, 2]
    kept = _filter(logits, 2, 1.0)
    assert torch.equal(kept[:2], logits[:2]), "kept logits are unchanged"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    want = torch.softmax(logits / temperature, dim=-1)
    n = 4000
    sampler = Sampler(seed=123)
    seqs = [seq_with(SamplingParams(temperature=temperature)) for _ in range(n)]
    drawn = [r.token_id for r in sampler.sample(logits.expand(n, 4).clone(), seqs)]
    freq = torch.bincount(torch.tensor(drawn), minlength=4).double() / n
    sigma = torch.sqrt(want.double() * (1 - want.double()) / n)
    assert torch.all((freq - want.double()).abs() < 5 * sigma + 1e-3), (freq, want)


def test_seeded_draw_depends_only_on_seed_position_and_logits():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def draw(engine_seed, seed, num_out, batch_rows=()):
        s = seq_with(SamplingParams(temperature=1.0, seed=seed), num_out)
        others = [seq_with(SamplingParams(temperature=1.0)) for _ in batch_rows]
        batch = torch.stack([logits[0], *[logits[r] for r in batch_rows]])
        return Sampler(seed=engine_seed).sample(batch, [s, *others])[0].token_id

    first = [draw(0, 1234, k) for k in range(20)]
    assert first == [draw(99, 1234, k, [1, 2]) for k in range(20)], "engine seed and batch do not matter"
    assert len(set(first)) > 5, "each position draws afresh"
    assert first != [draw(0, 1235, k) for k in range(20)]


def test_sampler_logprobs_entries():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    ref = torch.log_softmax(logits[0], dim=-1)
    greedy = Sampler().sample(logits, [seq_with(SamplingParams(temperature=0, logprobs=2))])[0]
    assert greedy.token_id == 0
    assert list(greedy.logprobs) == [0, 2], "the sampled token first, then the top alternatives"
    assert greedy.logprobs == pytest.approx({0: ref[0].item(), 2: ref[2].item()})
    forced = Sampler().sample(logits, [seq_with(SamplingParams(temperature=1.0, top_p=1.0, logprobs=2))])
    tok = forced[0].token_id
    assert len(forced[0].logprobs) == (2 if tok in (0, 2) else 3)
    only = Sampler().sample(logits, [seq_with(SamplingParams(temperature=0, logprobs=0))])[0]
    assert only.logprobs == pytest.approx({0: ref[0].item()})
    none = Sampler().sample(logits, [seq_with(SamplingParams(temperature=0))])[0]
    assert none.logprobs is None


# ---- the engine ---------------------------------------------------------------------------------------
def test_seed_is_reproducible_whatever_the_batch(tiny_llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    alone = toks(tiny_llm, [P[0]], sp)[0]
    mixed = tiny_llm.generate(
        [P[1], P[0], P[2], P[4]],
        [SamplingParams(max_tokens=5, temperature=0.7), sp, SamplingParams(max_tokens=20, temperature=1.3),
         SamplingParams(max_tokens=3, temperature=0)],
    )
    assert mixed[1].token_ids == alone
    again = toks(tiny_llm, [P[0]], sp)[0]
    assert again == alone
    other_engine = LLM("tiny", num_blocks=64, seed=7)
    assert toks(other_engine, [P[3], P[0]], sp)[1] == alone, "another engine with another engine seed"
    assert toks(tiny_llm, [P[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=43, ignore_eos=True))[0] != alone


def test_seeded_sampling_survives_preemption():
    sp = SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
    prompts = [list(range(3 + i, 40 + i)) for i in range(6)]
    roomy = LLM("tiny", num_blocks=128)
    want = toks(roomy, prompts, sp)
    tight = LLM("tiny", num_blocks=7)  # 6 x 61 tokens need 24 blocks: sequences are preempted and recomputed
    assert toks(tight, prompts, sp) == want
    assert tight.engine.scheduler.num_preemptions > 0
    assert_idle(tight.engine)


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_llm):
    greedy = toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True)) == greedy
    assert toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, ignore_eos=True)) == greedy
    hot = toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True))
    assert hot != greedy, "sampling at temperature 1 differs from greedy somewhere"
    seeded = toks(tiny_llm, P, SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))
    assert seeded != greedy


def test_max_tokens_gives_length(tiny_llm):
    outs = tiny_llm.generate(P, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [7] * len(P)
    assert {o.finish_reason for o in outs} == {"length"}
    one = tiny_llm.generate([P[0]], SamplingParams(max_tokens=1, temperature=0))[0]
    assert one.token_ids == outs[0].token_ids[:1] and one.finish_reason in ("length", "stop")


def test_stop_token_ids(tiny_llm):
    greedy = tiny_llm.generate([P[4]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 10
    target = greedy.token_ids[3]
    cut = greedy.token_ids.index(target) + 1
    out = tiny_llm.generate(
        [P[4]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(target,), ignore_eos=True)
    )[0]
    assert out.token_ids == greedy.token_ids[:cut] and out.token_ids[-1] == target
    assert out.finish_reason == "stop"


def test_eos_stops_unless_ignored(tiny_llm):
    assert tiny_llm.engine.eos_token_ids == {2}
    prompts = [[s, s + 1] for s in range(3, 300, 3)]
    outs = tiny_llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0))
    stopped = [(p, o) for p, o in zip(prompts, outs, strict=True) if o.finish_reason == "stop"]
    assert stopped, "the random tiny model reaches eos from some prompt"
    for _, o in stopped:
        assert o.token_ids[-1] == 2 and 2 not in o.token_ids[:-1]
    for o in outs:
        assert o.finish_reason == "stop" or (len(o.token_ids) == 30 and 2 not in o.token_ids)
    prompt, o = stopped[0]
    ig = tiny_llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert len(ig.token_ids) == 30 and ig.token_ids[: len(o.token_ids)] == o.token_ids
    assert ig.finish_reason == "length"


def _stop_case(tiny_llm):
    base = tiny_llm.generate(["Hello world"], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    text = base.text
    spots = [i for i in range(2, len(text) - 2) if (text[i : i + 2]).isprintable() and "\ufffd" not in text[i : i + 2]]
    assert spots, f"need some printable output, got {text!r}"
    return base, text, text[spots[len(spots) // 2] : spots[len(spots) // 2] + 2]


def test_stop_strings_cut_the_text(tiny_llm):
    base, text, stop = _stop_case(tiny_llm)
    assert text == tiny_llm.tokenizer.decode(base.token_ids, skip_special_tokens=True)
    out = tiny_llm.generate(["Hello world"], SamplingParams(max_tokens=32, temperature=0, stop=(stop,), ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    k = len(out.token_ids)
    assert out.token_ids == base.token_ids[:k], "generation stops at the token that completes the stop string"
    dec = tiny_llm.tokenizer.decode
    assert stop in dec(out.token_ids) and stop not in dec(out.token_ids[:-1])
    # a second, later stop string does not matter; an earlier one wins whichever order they are listed in
    late = text[-2:] if text.find(text[-2:]) > text.find(stop) else "\u2603\u2603"
    params = SamplingParams(max_tokens=32, temperature=0, stop=(late, stop), ignore_eos=True)
    both = tiny_llm.generate(["Hello world"], params)[0]
    assert both.text == out.text and both.token_ids == out.token_ids


def test_streamed_text_never_shows_the_stop_string(tiny_llm):
    _, text, stop = _stop_case(tiny_llm)
    eng = tiny_llm.engine
    eng.add_request("stream", "Hello world", SamplingParams(max_tokens=32, temperature=0, stop=(stop,), ignore_eos=True))
    deltas = []
    while eng.has_unfinished():
        for o in eng.step():
            deltas.append(o.text_delta)
            last = o
    assert last.finished and last.finish_reason.value == "stop"
    assert "".join(deltas) == text[: text.find(stop)]
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_logprobs(tiny_llm):
    o = tiny_llm.generate([P[1]], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(o.logprobs) == 5
    for tok, lp in zip(o.token_ids, o.logprobs, strict=True):
        assert next(iter(lp)) == tok and all(v <= 0 for v in lp.values())
        assert len(lp) == 3, "greedy's token is the top one, so it is among the 3 alternatives"
        assert lp[tok] == max(lp.values())
    # the first token's logprobs are HF's log-softmax at the end of the prompt
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(tiny_llm.engine.runner.model_path)(torch.tensor([P[1]])).logits[0, -1], -1)
    assert o.logprobs[0] == pytest.approx({t: ref[t].item() for t in o.logprobs[0]}, abs=1e-4)
    hot = tiny_llm.generate(P, SamplingParams(max_tokens=20, temperature=3.0, seed=3, logprobs=2, ignore_eos=True))
    sizes = set()
    for out in hot:
        for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
            top2 = sorted(lp.values(), reverse=True)[:2]
            assert len(lp) == (2 if lp[tok] in top2 else 3)
            assert all(v <= 0 and math.isfinite(v) for v in lp.values())
            sizes.add(len(lp))
    assert 3 in sizes, "at temperature 3 some sampled tokens are outside the top 2"
    plain = tiny_llm.generate([P[1]], SamplingParams(max_tokens=2, temperature=0))[0]
    assert plain.logprobs == []


# ---- stop strings and incremental detokenization ---------------------------------------------------------
def test_stop_checker_split_across_deltas_and_holdback():
    sc = StopChecker(("STOP",))
    assert sc.push("abc ST") == "abc "  # "ST" may begin the stop string: held back
    assert sc.push("O") == ""
    assert sc.push("P tail") == "" and sc.hit
    assert sc.text == "abc " and sc.flush() == ""
    assert sc.push("more") == "", "nothing after a hit"
    sc2 = StopChecker(("xyz",))
    assert sc2.push("ab x") == "ab "
    assert sc2.push("y!") == "xy!"  # not a stop after all: released
    assert sc2.flush() == "" and not sc2.hit
    sc3 = StopChecker(("end",))
    assert sc3.push("the en") == "the "
    assert sc3.flush() == "en", "held text comes out when the sequence ends without a stop"
    assert StopChecker(()).push("anything") == "anything"


def test_stop_checker_earliest_of_several_and_at_the_start():
    sc = StopChecker(("world", "lo w"))
    assert sc.push("hello world") == "hel" and sc.hit and sc.text == "hel"
    sc = StopChecker(("abc", "b"))
    assert sc.push("a") == ""  # "a" may begin "abc": held back
    assert sc.push("bc") == "" and sc.hit and sc.text == "", "abc starts before b"
    first = StopChecker(("##",))
    assert first.push("##x") == "" and first.hit and first.text == ""


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab#", max_size=20),
    cuts=st.lists(st.integers(0, 20), max_size=6),
    stops=st.lists(st.text(alphabet="ab#", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_stop_checker_matches_a_whole_string_search(text, cuts, stops):
    """However the text is split into deltas: the streamed text is the text before the first stop."""
    sc = StopChecker(tuple(stops))
    pieces, prev = [], 0
    for c in sorted(cuts) + [len(text)]:
        pieces.append(text[prev:c])
        prev = max(prev, c)
    streamed = ""
    for p in pieces:
        streamed += sc.push(p)
        assert not any(s in streamed for s in stops), "a stop string (or part of one that completes) leaked"
    streamed += sc.flush()
    # the reference: the first delta after which the text holds a stop string cuts at that stop's start
    expected, acc = text, ""
    for p in pieces:
        acc += p
        hits = [acc.find(s) for s in stops if s in acc]
        if hits:
            expected = acc[: min(hits)]
            break
    assert streamed == expected and sc.hit == (expected != text or any(s in text for s in stops))


@functools.cache
def tiny_tokenizer():
    return load_tokenizer(resolve_model("tiny")[0])


@settings(max_examples=100, deadline=None)
@given(data=st.lists(st.sampled_from(list("aZ ") + ["\u00e9", "\u2713", "\U0001f600"]), max_size=8),
       junk=st.lists(st.integers(3, 319), max_size=4))
def test_incremental_detokenizer_joins_to_the_full_decode(data, junk):
    tok = tiny_tokenizer()
    ids = [3 + b for b in "".join(data).encode()] + junk  # multi-byte characters split over tokens
    d = IncrementalDetokenizer(tok)
    streamed = "".join(d.push(i) for i in ids) + d.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=True)
