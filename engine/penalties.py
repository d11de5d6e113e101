"""Logit penalties and ``min_tokens``, batched over a step's sampling rows, before the sampler picks a token.

As vLLM and OpenAI define them (``SamplingParams``):
- ``repetition_penalty`` r: every token in the prompt or the output has its logit divided by r when positive,
  multiplied by r when not;
- ``frequency_penalty`` f and ``presence_penalty`` p: a token generated c times loses f * c + p * (c > 0);
- ``logit_bias`` (OpenAI's) is added; ``allowed_token_ids`` (vLLM's) leaves every other token at -inf;
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


def _keys(seqs: dict[int, Sequence], tokens, vocab: int, device: torch.device) -> torch.Tensor:
    """Flat indices (row * vocab + token) into [rows, vocab] logits of ``tokens(seq)`` for each row's sequence."""
    return torch.tensor([row * vocab + t for row, seq in seqs.items() for t in tokens(seq) if t < vocab],
                        dtype=torch.long, device=device)


def _penalize(logits: torch.Tensor, seqs: dict[int, Sequence]) -> None:
    """Apply each listed row's penalties to ``logits`` [rows, vocab] in place. Sparse: only the (row, token) pairs
    a prompt or an output holds are read and written, never a [rows, vocab] temporary."""
    dev, dtype = logits.device, logits.dtype
    vocab = logits.shape[-1]
    flat = logits.view(-1)
    keys, counts = torch.unique(_keys(seqs, generated_ids, vocab, dev), return_counts=True)
    none = (1.0, 0.0, 0.0)  # per row: repetition, frequency, presence (a row not listed: no penalty)
    factors = torch.tensor([(q.params.repetition_penalty, q.params.frequency_penalty, q.params.presence_penalty)
                            if (q := seqs.get(row)) is not None else none for row in range(logits.shape[0])],
                           dtype=dtype, device=dev)  # one tensor from host data, not one per row
    repeated = {row: seq for row, seq in seqs.items() if seq.params.repetition_penalty != 1}
    if repeated:  # first, as vLLM: every token of the prompt or the output
        prompts = [row * vocab + ids[ids < vocab] for row, ids in ((r, _prompt_ids(q, dev)) for r, q in
                                                                    repeated.items())]
        seen = torch.unique(torch.cat([keys, *prompts]))
        rep = factors[seen // vocab, 0]
        v = flat[seen]
        flat[seen] = torch.where(v > 0, v / rep, v * rep)
    rows = keys // vocab
    flat.index_add_(0, keys, -(factors[rows, 1] * counts.to(dtype) + factors[rows, 2]))


@torch.inference_mode()  # the runner's logits are inference tensors: updated in place only in this mode
def apply(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int], inplace: bool = False
          ) -> torch.Tensor:
    """``logits`` [len(seqs), vocab] of a step's sampling rows with penalties and ``min_tokens`` applied: the same
    tensor when no row asks for them or ``inplace`` (the caller needs no raw logits: no row wants logprobs), else
    a copy."""
    penalized = {i: s for i, s in enumerate(seqs) if s.params.penalized}
    banned = {i: s for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens}
    biased = {i: s for i, s in enumerate(seqs) if s.params.logit_bias}
    allowed = {i: s for i, s in enumerate(seqs) if s.params.allowed_token_ids}
    if not (penalized or banned or biased or allowed):
        return logits
    out = logits if inplace else logits.clone()
    if penalized:
        _penalize(out, penalized)
    if biased:  # OpenAI's logit_bias: added as it is
        keys = _keys(biased, lambda q: [t for t, _ in q.params.logit_bias], logits.shape[-1], logits.device)
        values = [b for q in biased.values() for t, b in q.params.logit_bias if t < logits.shape[-1]]
        out.view(-1).index_add_(0, keys, torch.tensor(values, dtype=out.dtype, device=out.device))
    if allowed:  # vLLM's allowed_token_ids: everything else at -inf
        local = dict(enumerate(allowed.values()))  # the allowed rows only, renumbered
        keep = torch.zeros(len(local), logits.shape[-1], dtype=torch.bool, device=out.device)
        keep.view(-1)[_keys(local, lambda q: q.params.allowed_token_ids, logits.shape[-1], logits.device)] = True
        rows = torch.tensor(list(allowed), dtype=torch.long, device=out.device)
        out[rows] = out[rows].masked_fill(~keep, float("-inf"))
    if banned:
        vocab = logits.shape[-1]
        out.view(-1)[_keys(banned, _ends(eos_token_ids), vocab, logits.device)] = float("-inf")
    return out


def _ends(eos_token_ids: set[int]):
    """What ``min_tokens`` holds back for a sequence: its stop tokens, and EOS unless it ignores EOS."""
    return lambda seq: {*(() if seq.params.ignore_eos else eos_token_ids), *seq.params.stop_token_ids}
