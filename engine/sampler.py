"""Token sampling: greedy, temperature, min-p, top-k, top-p, per-request seeds, optional logprobs; penalties and
``min_tokens`` first (``engine.penalties``).

Batched: the rows that sample (temperature > 0) are scaled, filtered and drawn together, whatever mix of
temperatures, top-k, top-p and seeds they carry, with no per-row tensor work. A draw is by inverse transform:
one uniform number per row against the row's cumulative distribution (``searchsorted``), so the randomness a row
needs is one 53-bit number, made on the host from a hash. For a seeded request it is a hash of (seed, position):
its tokens do not depend on the batch, the engine, or which worker samples (prefill, decode, migration); an
unseeded row's comes from the engine's generator, one draw per step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pdserve.engine import penalties, structured
from pdserve.engine.hashing import hash_block
from pdserve.engine.sequence import Sequence


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None  # sampled token first, then the top alternatives


def _mask_sorted(ordered: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Rows of logits sorted descending, masked to each row's top-k (ties at the k-th value kept) and then to its
    nucleus: the smallest prefix by probability whose mass reaches top_p."""
    kth = ordered.gather(1, (top_k.clamp(1, ordered.shape[-1]) - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) > top_p[:, None]  # mass before this token already reaches top_p
    return ordered.masked_fill(drop, float("-inf"))


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row of [rows, vocab] logits masked to its top-k (``top_k[r]`` >= vocab: off) then top-p (1: off)
    support, in vocabulary order. One sort for the batch."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    return torch.full_like(logits, float("-inf")).scatter_(1, order, _mask_sorted(ordered, top_k, top_p))


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One 1-D row through ``filter_rows`` (top_k <= 0: off)."""
    vocab = logits.shape[-1]
    k = torch.tensor([top_k if 0 < top_k < vocab else vocab], device=logits.device)
    return filter_rows(logits[None], k, torch.tensor([top_p], device=logits.device))[0]


NUM_PARAMS = 6  # a sampling row's parameters in the host buffer: temperature, top_k, top_p, u, row, min_p


class Sampler:
    def __init__(self, seed: int = 0, max_rows: int = 256, eos_token_ids: set[int] | None = None):
        self.rng = random.Random(seed)  # host-side: drawing a step's key reads nothing back from the device
        self.eos_token_ids = eos_token_ids or set()  # what min_tokens holds back (with each row's stop_token_ids)
        self._params_buffer(max_rows)

    def _params_buffer(self, rows: int) -> None:
        """The host buffer of the sampling rows' parameters, made once (grown only past ``rows``): a step writes it
        through numpy and hands torch a slice, so no tensor is built from host data per step."""
        self._params = torch.empty(rows, NUM_PARAMS, dtype=torch.float64, pin_memory=torch.cuda.is_available())
        self._params_np = self._params.numpy()  # row-major [rows, 6]: a step's first m rows are one contiguous block

    def _uniforms(self, seqs: list[Sequence]) -> list[float]:
        """One number in [0, 1) per sampling row: seeded requests draw token i from a hash of (seed, i), stateless,
        so the same tokens come out whatever the batch; the rest from one engine draw per step."""
        step = self.rng.getrandbits(62)
        out = []
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.seed is None:
                key = hash_block(step, [row])
            else:
                key = hash_block(p.seed & 0xFFFFFFFFFFFFFFFF, [seq.sample_offset + len(seq.output_token_ids)])
            out.append((key >> 11) * (1.0 / (1 << 53)))
        return out

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int], tokens: torch.Tensor | None
              ) -> torch.Tensor:
        """``tokens`` (the greedy picks; None when every row samples) with a drawn token in each row ``rows`` of
        ``logits`` [n, vocab] (the rows that sample; ``seqs`` theirs), all drawn at once. Their parameters reach
        the device in one non-blocking copy (none on CPU: the tensor is the numpy buffer's memory)."""
        dev, vocab = logits.device, logits.shape[-1]
        params = [s.params for s in seqs]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        m = len(rows)
        if m > self._params.shape[0]:
            self._params_buffer(2 * m)
        host = self._params_np
        host[:m, 0] = [p.temperature for p in params]
        host[:m, 1], host[:m, 2], host[:m, 3], host[:m, 4] = top_k, top_p, self._uniforms(seqs), rows
        min_p = [p.min_p for p in params]
        host[:m, 5] = min_p
        packed = self._params[:m]
        if dev.type != "cpu":  # pinned and contiguous: an async copy; the buffer is rewritten only after this
            packed = packed.to(dev, non_blocking=True)  # step's results were read back
        packed = packed.t()  # [6, m]: temperature, top_k, top_p, u, row, min_p
        if tokens is not None:  # some rows are greedy: draw for the others only
            index = packed[4].long()
            logits = logits.index_select(0, index)
        scaled = logits / packed[0].to(logits.dtype)[:, None]
        if max(min_p) > 0:  # drop what is less likely than min_p x the likeliest (log 0 = -inf: the row is kept)
            floor = scaled.max(dim=-1, keepdim=True).values + packed[5].log().to(logits.dtype)[:, None]
            scaled = scaled.masked_fill(scaled < floor, float("-inf"))
        cand, order = scaled, None  # the candidates, and (when filtered) their token ids
        if min(top_k) < vocab or min(top_p) < 1.0:
            if max(top_k) < vocab:  # every row has a top-k: its candidates are the largest max(top_k), sorted
                cand, order = torch.topk(scaled, max(top_k), dim=-1)
            else:
                cand, order = torch.sort(scaled, dim=-1, descending=True)
            cand = _mask_sorted(cand, packed[1].long(), packed[2].to(logits.dtype))
        cdf = torch.softmax(cand, dim=-1).double().cumsum_(dim=-1)  # float64: exact enough over 150k entries
        # the first candidate whose cumulative mass exceeds u * total (zero-mass candidates never do)
        pick = torch.searchsorted(cdf, (packed[3] * cdf[:, -1])[:, None], right=True).clamp_(max=cand.shape[-1] - 1)
        drawn = pick[:, 0] if order is None else order.gather(1, pick)[:, 0]
        return drawn if tokens is None else tokens.index_copy(0, index, drawn)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """logits: float32 [len(seqs), vocab], which penalties may overwrite. ``launch`` then ``results``."""
        return self.launch(logits, seqs).results()

    def launch(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleLaunch:
        """Queue the step's sampling on the logits' device; nothing here waits for the device (on CUDA the engine
        does host work meanwhile, then ``results`` reads everything back in one copy: one sync per step, however
        many rows sample or ask for logprobs)."""
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        lp_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        # the runner's logits serve this step alone: penalized in place unless logprobs need them raw
        chosen = penalties.apply(logits, seqs, self.eos_token_ids, inplace=not lp_rows)
        chosen = structured.mask(chosen, seqs, inplace=chosen is not logits or not lp_rows)  # grammars' masks
        if len(rows) == len(seqs):
            tokens = self._draw(chosen, seqs, rows, None)
        else:
            # max's indices: the first maximal value, as argmax, but ~1.6x faster on CPU ([64, 151936]: 11 vs 17 ms)
            tokens = torch.max(chosen, dim=-1).indices
            if rows:
                tokens = self._draw(chosen, [seqs[i] for i in rows], rows, tokens)
        if not lp_rows:
            return SampleLaunch(tokens, len(seqs), [], [])
        logprobs = torch.log_softmax(logits, dim=-1)
        ints = [tokens]  # then each row's top-k ids
        floats = [logprobs.gather(1, tokens[:, None])[:, 0]]  # the sampled tokens' logprobs, then top-k values
        tops: list[tuple[int, int]] = []  # (row, k)
        for i in lp_rows:
            k = seqs[i].params.logprobs
            if k:
                top = torch.topk(logprobs[i], k)
                ints.append(top.indices)
                floats.append(top.values)
                tops.append((i, k))
        # float64 holds token ids (< 2**53) and float32 logprobs exactly: one tensor, one copy
        flat = torch.cat([torch.cat(ints).double(), torch.cat(floats).double()])
        return SampleLaunch(flat, len(seqs), lp_rows, tops)


class SampleLaunch:
    """A step's sampling, queued on the device: ``results`` reads it back (the step's one device->host read)."""

    def __init__(self, flat: torch.Tensor, n: int, lp_rows: list[int], tops: list[tuple[int, int]]):
        self.flat, self.n, self.lp_rows, self.tops = flat, n, lp_rows, tops  # flat: the tokens alone without lp_rows

    def results(self) -> list[SampleResult]:
        if not self.lp_rows:
            return [SampleResult(t, None) for t in self.flat.tolist()]
        flat = self.flat.tolist()
        n, tops = self.n, self.tops
        num_top = sum(k for _, k in tops)
        ids = [int(t) for t in flat[:n]]
        top_ids, chosen, top_values = flat[n : n + num_top], flat[n + num_top : 2 * n + num_top], flat[2 * n + num_top :]
        lps: list[dict[int, float] | None] = [None] * n
        for i in self.lp_rows:
            lps[i] = {ids[i]: chosen[i]}
        pos = 0
        for i, k in tops:
            lp = lps[i]
            for t, v in zip(top_ids[pos : pos + k], top_values[pos : pos + k], strict=True):
                lp.setdefault(int(t), v)
            pos += k
        return [SampleResult(t, lp) for t, lp in zip(ids, lps, strict=True)]
