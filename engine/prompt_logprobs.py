"""Prompt logprobs (vLLM's ``SamplingParams.prompt_logprobs``): each prompt token's logprob given the tokens before
it, its rank over the vocabulary, and the k likeliest alternatives, as evaluation harnesses read them
(lm-evaluation-harness's vLLM backend asks for ``prompt_logprobs=1`` to score a continuation).

A request that asks for them runs its prompt with logits at every position (``BatchItem.all_logits``) and without
prefix-cache hits (a cached block has no logits). ``split`` takes those rows out of the step's logits, records the
entries by position (a chunk recomputed after a preemption writes the same values again) and hands the sampler the
one row per sampling request it expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.sequence import Sequence


@dataclass(slots=True)
class PromptLogprob:
    """The logprob of the prompt token at one position, with its rank (1: the likeliest), and the top alternatives
    (ids and logprobs, likeliest first)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


def wants(seq: Sequence) -> bool:
    """Whether the request's next chunk needs logits at every position: it asked and its prompt is not done."""
    return seq.params.prompt_logprobs is not None and seq.num_computed_tokens < len(seq.prompt_token_ids) - 1


def split(items: list, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """``logits`` of a step whose ``items`` (one per scheduled ``seqs``) may have ``all_logits``: records their
    prompt logprobs, returns the rows of the items that sample (their last), in order."""
    row, sample_rows = 0, []
    for it, seq in zip(items, seqs, strict=True):
        n = len(it.token_ids)
        if it.all_logits:
            _record(seq, it.start_pos, logits[row : row + n])
            if it.needs_logits:
                sample_rows.append(row + n - 1)
            row += n
        elif it.needs_logits:
            sample_rows.append(row)
            row += 1
    return logits.index_select(0, torch.tensor(sample_rows, dtype=torch.long, device=logits.device))


def _record(seq: Sequence, start: int, rows: torch.Tensor) -> None:
    """Row i predicts the token at position start + i + 1; rows past the prompt (a recomputed chunk) are skipped."""
    prompt = seq.prompt_token_ids
    targets = prompt[start + 1 : min(start + 1 + rows.shape[0], len(prompt))]
    if not targets:
        return
    if seq.prompt_logprobs is None:
        seq.prompt_logprobs = [None] * (len(prompt) - 1)
    lp = torch.log_softmax(rows[: len(targets)].float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.long, device=lp.device)[:, None]
    chosen = lp.gather(1, index)[:, 0]
    ranks = (lp > chosen[:, None]).sum(dim=-1) + 1
    k = seq.params.prompt_logprobs
    top = torch.topk(lp, k) if k else None
    chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
    top_ids = top.indices.tolist() if top is not None else [[] for _ in targets]
    top_vals = top.values.tolist() if top is not None else [[] for _ in targets]
    for i, t in enumerate(targets):
        seq.prompt_logprobs[start + i] = PromptLogprob(t, chosen_l[i], ranks_l[i], top_ids[i], top_vals[i])
