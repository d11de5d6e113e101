"""Prompt logprobs (engine.prompt_logprobs) against transformers' own logits: every prompt position, in one step or
in chunks, past the prefix cache, next to requests that do not ask, with the other requests' tokens untouched."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.engine.helpers import assert_idle, hf_model

PROMPT = [3 + (j * 13) % 250 for j in range(37)]
K = 3


def _reference(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every prompt position, float32."""
    with torch.no_grad():
        logits = hf_model(llm.engine.runner.model_path)(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _check(entries, ref: torch.Tensor, prompt: list[int]) -> None:
    assert entries[0] is None and len(entries) == len(prompt)
    for pos, entry in enumerate(entries[1:]):
        row, token = ref[pos], prompt[pos + 1]
        got = entry[token]
        assert got.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert got.rank == int((row > row[token]).sum()) + 1
        top = torch.topk(row, K)
        others = [t for t in entry if t != token]
        assert set(others) <= set(top.indices.tolist()) and len(entry) in (K, K + 1)
        for t in others:
            assert entry[t].logprob == pytest.approx(row[t].item(), abs=1e-4)


@pytest.mark.parametrize("chunk, impl", [(None, "native"), (8, "native"), (8, "hf")])
def test_prompt_logprobs_match_transformers_whole_or_in_chunks(chunk, impl):
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    llm = LLM("tiny", num_blocks=128, model_impl=impl, **kw)
    (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=K))
    _check(out.prompt_logprobs, _reference(llm, PROMPT), PROMPT)
    assert_idle(llm.engine)


def test_a_cached_prompt_is_computed_again_and_others_in_the_batch_are_untouched():
    llm = LLM("tiny", num_blocks=128, async_output="on")
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    other = [7, 8, 9, 10, 11, 12]
    alone = [o.outputs[0].token_ids for o in llm.generate([PROMPT, other], greedy)]  # PROMPT is now cached
    asked = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0)
    both = llm.generate([PROMPT, other], [asked, greedy])
    assert [o.outputs[0].token_ids for o in both] == alone
    _check_no_top(both[0].prompt_logprobs, _reference(llm, PROMPT), PROMPT)
    assert both[1].prompt_logprobs is None and both[0].num_cached_tokens == 0
    assert_idle(llm.engine)


def _check_no_top(entries, ref, prompt):
    assert entries[0] is None and len(entries) == len(prompt)
    for pos, entry in enumerate(entries[1:]):
        assert list(entry) == [prompt[pos + 1]]
        assert entry[prompt[pos + 1]].logprob == pytest.approx(ref[pos, prompt[pos + 1]].item(), abs=1e-4)


def test_prompt_logprobs_are_checked():
    with pytest.raises(ValueError, match=r"prompt_logprobs: must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=21)
