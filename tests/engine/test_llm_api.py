"""The offline API in vLLM's shape: ``RequestOutput.outputs[i]``, dict prompts, ``SamplingParams(n=...)``,
``use_tqdm``; a script written for vLLM's ``LLM.generate`` runs unchanged."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_outputs_have_vllms_shape_and_the_top_level_fields_agree(tiny_llm):
    (out,) = tiny_llm.generate("Hello there", GREEDY, use_tqdm=False)
    assert out.prompt == "Hello there" and out.prompt_token_ids and out.finished
    (first,) = out.outputs
    assert first.index == 0 and len(first.token_ids) == 6 and first.finish_reason == "length"
    assert (out.token_ids, out.text, out.finish_reason) == (first.token_ids, first.text, first.finish_reason)
    assert first.cumulative_logprob is None  # no logprobs asked


def test_dict_prompts_mean_what_they_mean_in_vllm(tiny_llm):
    ids = tiny_llm.tokenizer.encode("Hello there")
    by_text, by_ids, plain = tiny_llm.generate(
        [{"prompt": "Hello there"}, {"prompt_token_ids": ids}, "Hello there"], GREEDY)
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids == plain.outputs[0].token_ids
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    with pytest.raises(ValueError, match="'prompt' or 'prompt_token_ids'"):
        tiny_llm.generate({"text": "Hello"}, GREEDY)


def test_n_gives_n_completions_seeded_ones_reproducible_and_distinct(tiny_llm):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True, logprobs=0)
    (a,) = tiny_llm.generate("Once upon a time", params)
    (b,) = tiny_llm.generate("Once upon a time", params)
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1, "n seeded samples should differ"
    (one,) = tiny_llm.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=1.0, seed=7,
                                                                   ignore_eos=True, logprobs=0))
    assert a.outputs[0].token_ids == one.outputs[0].token_ids  # completion 0 is the n=1 request
    lp = a.outputs[1]
    assert lp.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(lp.token_ids, lp.logprobs, strict=True)))
    (greedy,) = tiny_llm.generate("Once upon a time", SamplingParams(max_tokens=5, temperature=0, n=2))
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


@pytest.mark.parametrize("n", [0, -1, 129, True, 1.5])
def test_a_bad_n_is_refused(n):
    with pytest.raises(ValueError, match="n:"):
        SamplingParams(n=n)


def test_an_error_midway_leaves_no_request_behind():
    llm = LLM("tiny", num_blocks=64)
    with pytest.raises(ValueError):
        llm.generate(["Hello", {"bad": 1}], SamplingParams(max_tokens=2, n=2))
    assert not llm.engine.has_unfinished() and llm.engine.seqs == {}
    with pytest.raises(ValueError, match="token"):  # refused by the engine after the first prompt's 2 were added
        llm.generate([[5, 6, 7], [10**9]], SamplingParams(max_tokens=2, n=2))
    assert not llm.engine.has_unfinished() and llm.engine.seqs == {}
    llm.engine.check_integrity()
