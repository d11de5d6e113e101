"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, optional logprobs.

A request with a seed owns a torch.Generator seeded once, and draws from it alone, so its tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.hashing import hash_block
from engine.sequence import Sequence


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None  # sampled token first, then the top alternatives


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask a 1-D logits row to its top-k / nucleus top-p support."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


class Sampler:
    def __init__(self, seed: int = 0, device: str = "cpu"):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.device = device

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        """Seeded requests draw token i from a generator seeded by (seed, i): stateless, so the same
        tokens come out whatever the batch, and whichever worker samples (prefill, decode, migration)."""
        if seq.params.seed is None:
            return self.generator
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
        step_seed = hash_block(seq.params.seed & 0xFFFFFFFFFFFFFFFF, [seq.sample_offset + len(seq.output_token_ids)])
        seq.generator.manual_seed(step_seed & 0x7FFFFFFFFFFFFFFF)
        return seq.generator

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """logits: float32 [len(seqs), vocab]."""
        greedy_ids = torch.argmax(logits, dim=-1).tolist()
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        results: list[SampleResult] = []
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.greedy:
                token = greedy_ids[i]
            else:
                row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
                probs = torch.softmax(row, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self._generator_for(seq)).item())
            lp = None
            if p.logprobs is not None and logprobs is not None:
                lp = {token: float(logprobs[i, token])}
                if p.logprobs:
                    top = torch.topk(logprobs[i], p.logprobs)
                    for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                        lp.setdefault(t, v)
            results.append(SampleResult(token, lp))
        return results
