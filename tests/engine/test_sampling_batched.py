"""The batched sampler (engine.sampler): a mixed batch of temperatures, top-k, top-p and seeds is drawn with the
same tensor ops whatever its size (no per-row loop), and each row follows its own distribution."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pdserve import SamplingParams
from pdserve.engine.sampler import Sampler
from pdserve.engine.sequence import Sequence

KINDS = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=3),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=0.9, top_k=4, top_p=0.8, seed=11),
    dict(temperature=0),
]


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _seqs(n: int) -> list[Sequence]:
    return [Sequence(f"s{i}", [5], SamplingParams(**KINDS[i % len(KINDS)])) for i in range(n)]


def _expected(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The row's distribution, computed plainly (numpy-style, row by row) as the reference."""
    if p.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).double()
    x = (logits / p.temperature).double()
    order = torch.argsort(x, descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    k = p.top_k if p.top_k > 0 else len(x)
    probs = torch.softmax(x[order][:k], dim=0)
    mass = 0.0
    for j, pr in enumerate(probs.tolist()):
        if mass >= p.top_p:
            break
        keep[order[j]] = True
        mass += pr
    out = torch.where(keep, torch.exp(x - x.max()), torch.zeros_like(x))
    return out / out.sum()


def test_a_mixed_batch_dispatches_the_same_ops_at_any_size():
    logits = torch.randn(64, 500)
    counts = []
    for n in (5, 10, 64):
        with Ops() as log:
            Sampler(0).sample(logits[:n].clone(), _seqs(n))
        counts.append(log.ops)
    assert counts[0] == counts[1] == counts[2], counts


@pytest.mark.parametrize("kind", range(len(KINDS)))
def test_each_row_of_a_mixed_batch_follows_its_own_distribution(kind):
    vocab, rows = 6, 5000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0])
    seqs = _seqs(rows * len(KINDS))  # every kind in the same batches
    for i, s in enumerate(seqs):
        s.output_token_ids = [0] * (i // len(KINDS))  # seeded rows: each its own position, so its own draw
    drawn = [r.token_id for r in Sampler(3).sample(logits.expand(len(seqs), vocab).clone(), seqs)]
    mine = [t for i, t in enumerate(drawn) if i % len(KINDS) == kind]
    freq = torch.bincount(torch.tensor(mine), minlength=vocab).double() / len(mine)
    want = _expected(logits, seqs[kind].params)
    sigma = torch.sqrt(want * (1 - want) / len(mine))
    assert torch.all((freq - want).abs() <= 5 * sigma + 1e-3), (kind, freq, want)
    assert torch.all(freq[want == 0] == 0), "nothing outside the support"
