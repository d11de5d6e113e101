"""Logit penalties and ``min_tokens``, batched over a step's sampling rows, before the sampler picks a token.

As vLLM and OpenAI define them (``SamplingParams``):
- ``repetition_penalty`` r: every token in the prompt or the output has its logit divided by r when positive,
  multiplied by r when not;
- ``frequency_penalty`` f and ``presence_penalty`` p: a token generated c times loses f * c + p * (c > 0);
- ``min_tokens`` m: EOS (unless ``ignore_eos``) and ``stop_token_ids`` cannot be drawn while fewer than m tokens
  were generated on this worker (a migration lowers ``min_tokens`` and ``max_tokens`` alike by what was streamed).

"Generated" includes what another worker streamed before a migration (the prompt's last ``sample_offset`` tokens),
so a migrated request is penalized as the uninterrupted one would have been. Logprobs stay those of the raw logits
(vLLM's default). Rows that ask for none of this cost nothing: the logits are returned as they are.
"""

from __future__ import annotations

import torch

from pdserve.engine.sequence import Sequence


def generated_ids(seq: Sequence) -> list[int]:
    """The tokens the request generated so far, on this worker and (before a migration) on others."""
    prompt = seq.prompt_token_ids
    prior = prompt[len(prompt) - seq.sample_offset :] if seq.sample_offset else []
    return prior + seq.output_token_ids


def _prompt_ids(seq: Sequence, device: torch.device) -> torch.Tensor:
    """The distinct ids of the request's prompt proper (without tokens generated before a migration), made once per
    request and device: a long prompt is not rebuilt into a tensor every step."""
    cached = seq.penalty_cache
    if cached is None or cached.device != device:
        prompt = seq.prompt_token_ids[: len(seq.prompt_token_ids) - seq.sample_offset]
        cached = seq.penalty_cache = torch.unique(torch.tensor(prompt, dtype=torch.long)).to(device)
    return cached


def _rows(tokens: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token in ``tokens`` (one list per row), as two index tensors."""
    rows = [j for j, ids in enumerate(tokens) for _ in ids]
    flat = [t for ids in tokens for t in ids]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(flat, dtype=torch.long, device=device))


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Rows of ``logits`` [m, vocab] (a copy) with their requests' penalties applied."""
    dev, dtype = logits.device, logits.dtype
    m, vocab = logits.shape
    generated = [[t for t in generated_ids(s) if t < vocab] for s in seqs]
    counts = torch.zeros(m, vocab, dtype=dtype, device=dev)
    rows, ids = _rows(generated, dev)
    counts.index_put_((rows, ids), torch.ones(len(ids), dtype=dtype, device=dev), accumulate=True)
    params = torch.tensor([[s.params.repetition_penalty, s.params.frequency_penalty, s.params.presence_penalty]
                           for s in seqs], dtype=dtype, device=dev)
    rep, freq, pres = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    if any(s.params.repetition_penalty != 1 for s in seqs):
        seen = counts > 0
        prompts = [_prompt_ids(s, dev) for s in seqs]
        prow = torch.repeat_interleave(torch.arange(m, device=dev), torch.tensor([len(p) for p in prompts],
                                                                                   device=dev))
        pids = torch.cat(prompts)
        keep = pids < vocab
        seen[prow[keep], pids[keep]] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - freq * counts - pres * (counts > 0).to(dtype)


def apply(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> torch.Tensor:
    """``logits`` [len(seqs), vocab] of a step's sampling rows with penalties and ``min_tokens`` applied: the same
    tensor when no row asks for them, else a new one (the raw logits stay for logprobs)."""
    penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
    banned = [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens]
    if not penalized and not banned:
        return logits
    out = logits.clone()
    if penalized:
        index = torch.tensor(penalized, dtype=torch.long, device=logits.device)
        out.index_copy_(0, index, _penalize(logits.index_select(0, index), [seqs[i] for i in penalized]))
    if banned:
        vocab = logits.shape[-1]
        ends = [[t for t in {*(() if seqs[i].params.ignore_eos else eos_token_ids), *seqs[i].params.stop_token_ids}
                 if t < vocab] for i in banned]
        rows, ids = _rows(ends, logits.device)
        out[torch.tensor(banned, dtype=torch.long, device=logits.device)[rows], ids] = float("-inf")
    return out
