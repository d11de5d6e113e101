"""Penalties, min_p and min_tokens (``engine.penalties``, ``engine.sampler``).

The batched code is checked against a per-row reference on mixed batches, and end to end against transformers'
own repetition penalty and a step-by-step reference loop over the HF model; a migrated request (prompt + the
tokens already streamed, ``sample_offset``) must be penalized as the uninterrupted one was.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine import penalties
from pdserve.engine.sampler import Sampler
from pdserve.engine.sequence import Sequence
from tests.engine.helpers import assert_idle, hf_model

PROMPT = [3 + (j * 7) % 200 for j in range(24)]
EOS = {2}


def _seq(params: SamplingParams, prompt=(5, 6, 7), output=(), sample_offset=0) -> Sequence:
    seq = Sequence("r", list(prompt), params)
    seq.output_token_ids = list(output)
    seq.sample_offset = sample_offset
    return seq


def _reference(row: torch.Tensor, seq: Sequence, eos: set[int]) -> torch.Tensor:
    """One row, token by token, from the definitions (vLLM's and OpenAI's)."""
    p, out = seq.params, row.clone()
    prompt = seq.prompt_token_ids
    generated = prompt[len(prompt) - seq.sample_offset:] if seq.sample_offset else []
    generated = generated + seq.output_token_ids
    if p.repetition_penalty != 1:
        for t in set(prompt) | set(generated):
            v = out[t].item()
            out[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t, c in Counter(generated).items():
        out[t] -= p.frequency_penalty * c + p.presence_penalty
    for t, b in p.logit_bias or ():
        out[t] += b
    if p.allowed_token_ids:
        out[[t for t in range(len(out)) if t not in p.allowed_token_ids]] = float("-inf")
    if len(seq.output_token_ids) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            out[t] = float("-inf")
    return out


def test_a_mixed_batch_is_penalized_as_each_row_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 40, generator=g) * 3
    seqs = [
        _seq(SamplingParams()),  # nothing asked: untouched
        _seq(SamplingParams(repetition_penalty=1.5), prompt=(1, 4, 4, 9), output=(9, 11)),
        _seq(SamplingParams(frequency_penalty=0.75, presence_penalty=-0.5), output=(3, 3, 3, 8)),
        _seq(SamplingParams(temperature=0, repetition_penalty=0.5, frequency_penalty=2, presence_penalty=2),
             prompt=(1, 2, 30, 31, 32), output=(31, 33), sample_offset=2),  # 30 is a prompt token, 31 generated
        _seq(SamplingParams(min_tokens=3, stop_token_ids=(17,)), output=(4,)),
        _seq(SamplingParams(min_tokens=3, stop_token_ids=(17,), ignore_eos=True), output=(4,)),  # EOS allowed
        _seq(SamplingParams(min_tokens=1, presence_penalty=1), output=(6,)),  # min_tokens reached: no ban
        _seq(SamplingParams(logit_bias={3: 5.0, 39: -100, 0: 0.5}, frequency_penalty=1), output=(3,)),
        _seq(SamplingParams(allowed_token_ids=(1, 5, 17), logit_bias={5: 2.0}, min_tokens=2), output=(4,)),
    ]
    got = penalties.apply(logits, seqs, EOS)
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(got[i], _reference(logits[i], seq, EOS), msg=f"row {i}")
    assert got[4, 2] == float("-inf") and got[5, 2] != float("-inf") and got[5, 17] == float("-inf")
    plain = [_seq(SamplingParams(max_tokens=3)), _seq(SamplingParams(temperature=0))]
    assert penalties.apply(logits[:2], plain, EOS) is not None
    assert penalties.apply(logits[:2], plain, EOS).data_ptr() == logits.data_ptr()  # no row asks: no copy


def test_logprobs_are_the_raw_logits_and_min_p_keeps_only_likely_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    drawn: dict[float, set[int]] = {}
    for min_p in (0.0, 0.5):
        seqs = [_seq(SamplingParams(seed=s, min_p=min_p)) for s in range(200)]
        seqs.append(_seq(SamplingParams(temperature=0)))  # a greedy row in the same batch
        out = Sampler(0).sample(logits.expand(len(seqs), 4).clone(), seqs)
        drawn[min_p] = {r.token_id for r in out[:-1]}
        assert out[-1].token_id == 0
    assert drawn[0.5] == {0, 1} and drawn[0.0] == {0, 1, 2, 3}  # 0.15 < 0.5 x 0.5 is dropped; 0.3 is not
    seq = _seq(SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=1), prompt=(0,))
    (r,) = Sampler(0).sample(logits[None].clone(), [seq])
    assert r.token_id == 1  # 0 penalized: log 0.5 x 2 < log 0.3
    assert r.logprobs[1] == pytest.approx(torch.log_softmax(logits, -1)[1].item())  # raw, as vLLM's default


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_blocks=128)


def _run(llm: LLM, rid: str, tokens: list[int], params: SamplingParams, sample_offset: int = 0):
    e = llm.engine
    e.add_request(rid, tokens, params, sample_offset=sample_offset)
    ids, text, reason = [], "", None
    while e.has_unfinished():
        for out in e.step():
            ids += out.new_token_ids
            text += out.text_delta
            reason = out.finish_reason.value if out.finished else reason
    assert_idle(e)
    return ids, text, reason


def _hf_greedy_penalized(path: str, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding over transformers' model, each step's logits through ``_reference``."""
    model, ids = hf_model(path), list(prompt)
    for _ in range(params.max_tokens):
        with torch.no_grad():
            row = model(torch.tensor([ids])).logits[0, -1].float()
        seq = _seq(params, prompt=prompt, output=ids[len(prompt):])
        ids.append(int(_reference(row, seq, EOS).argmax()))
    return ids[len(prompt):]


def test_greedy_repetition_penalty_matches_transformers(llm):
    from transformers import GenerationConfig

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.8)
    got, _, _ = _run(llm, "rep", PROMPT, params)
    plain, _, _ = _run(llm, "plain", PROMPT, dataclasses.replace(params, repetition_penalty=1.0))
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                           pad_token_id=0, eos_token_id=2)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = hf_model(llm.engine.runner.model_path).generate(ids, attention_mask=torch.ones_like(ids),
                                                               generation_config=cfg)[0, len(PROMPT):].tolist()
    assert got == want
    assert got != plain  # the penalty changed the answer: the comparison shows something


def test_frequency_and_presence_penalties_match_a_reference_loop_and_survive_migration(llm):
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, frequency_penalty=1.5,
                            presence_penalty=0.5)
    got, _, _ = _run(llm, "freq", PROMPT, params)
    assert got == _hf_greedy_penalized(llm.engine.runner.model_path, PROMPT, params)
    assert got != _run(llm, "plain", PROMPT, SamplingParams(max_tokens=14, temperature=0, ignore_eos=True))[0]
    for k in (1, 6, 13):  # another worker streamed k tokens, then died: they count as generated here too
        rest, _, _ = _run(llm, f"m{k}", PROMPT + got[:k], dataclasses.replace(params, max_tokens=14 - k),
                          sample_offset=k)
        assert got[:k] + rest == got, k


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(llm):
    base = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    plain, text, _ = _run(llm, "plain", PROMPT, base)
    first = plain[0]
    ids, _, reason = _run(llm, "stop", PROMPT, dataclasses.replace(base, stop_token_ids=(first,)))
    assert (ids, reason) == ([first], "stop")  # without min_tokens the first token ends it
    ids, _, _ = _run(llm, "min", PROMPT, dataclasses.replace(base, stop_token_ids=(first,), min_tokens=3))
    assert len(ids) >= 3 and first not in ids[:3]
    assert first not in ids[:-1]  # once allowed, it still ends the request
    stop = text[:2]
    assert stop.strip(), "the workload's first characters are printable"
    ids, got, reason = _run(llm, "str", PROMPT, dataclasses.replace(base, stop=(stop,)))
    assert (got, reason) == ("", "stop")
    least = len(ids) + 2  # past the token that completed the stop string
    ids, got, _ = _run(llm, "minstr", PROMPT, dataclasses.replace(base, stop=(stop,), min_tokens=least))
    assert len(ids) >= least and ids[:least] == plain[:least]  # the stop string found before did not end it


def test_logit_bias_and_allowed_token_ids_steer_the_engine(llm):
    base = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain, _, _ = _run(llm, "plain", PROMPT, base)
    forced = next(t for t in range(3, 300) if t not in plain)
    ids, _, _ = _run(llm, "bias", PROMPT, dataclasses.replace(base, logit_bias=((forced, 100.0),)))
    assert ids == [forced] * 6  # +100 outweighs any logit of this model
    allowed = (forced, forced + 1)
    ids, _, _ = _run(llm, "allowed", PROMPT, dataclasses.replace(base, temperature=1.0, seed=4,
                                                                 allowed_token_ids=allowed))
    assert set(ids) <= set(allowed)
    vocab = llm.engine.vocab_size
    for kw in (dict(logit_bias={vocab: 1.0}), dict(allowed_token_ids=[vocab])):
        with pytest.raises(ValueError, match=f"token id {vocab}"):
            llm.engine.add_request("bad", PROMPT, SamplingParams(**kw))
        assert_idle(llm.engine)
    # a stop token id past the vocabulary can never be generated: accepted, as before (clients send them)
    assert _run(llm, "stop-past", PROMPT, dataclasses.replace(base, stop_token_ids=(vocab + 7,)))[0] == plain


def test_include_stop_str_in_output_keeps_the_matched_stop_string(llm):
    base = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    _, text, _ = _run(llm, "plain", PROMPT, base)
    stop = text[4:6]
    cut = text.find(stop)
    assert stop.strip() and cut > 0
    _, got, reason = _run(llm, "cut", PROMPT, dataclasses.replace(base, stop=(stop,)))
    assert (got, reason) == (text[:cut], "stop")
    _, got, reason = _run(llm, "kept", PROMPT, dataclasses.replace(base, stop=(stop,), include_stop_str_in_output=True))
    assert (got, reason) == (text[:cut] + stop, "stop")
