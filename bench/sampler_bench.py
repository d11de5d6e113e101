"""The batched sampler (engine.sampler) against a per-row loop, in the same run, on the same logits.

    python -m bench.sampler_bench --threads 1

The baseline is the sampler as it was before it was batched, kept here: for each row that samples, its own
top-k / top-p filter, softmax and ``torch.multinomial`` with the row's generator. Both see batches of ``--rows``
rows (every row sampling) over vocabularies of 32,000 and 151,936, for four parameter mixes; the figure is
process CPU time per ``sample`` call (median of ``--repeat``), and the ratio is baseline / batched.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdserve import SamplingParams
from pdserve.engine.sampler import Sampler
from pdserve.engine.sequence import Sequence

MIXES = {
    "temperature": dict(temperature=0.8),
    "top_k 50 + top_p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p 0.9": dict(temperature=0.8, top_p=0.9),
    "seeded": dict(temperature=0.8, seed=3),
}


def per_row(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """The per-row baseline: filter, softmax and multinomial, one row at a time."""
    picks = []
    for i, p in enumerate(params):
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(row, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            ordered = ordered.masked_fill(torch.cumsum(probs, dim=-1) - probs > p.top_p, float("-inf"))
            row = torch.full_like(row, float("-inf")).scatter(0, order, ordered)
        picks.append(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generators[i]))
    return torch.cat(picks).tolist()


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1000


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"rows {a.rows}, threads {torch.get_num_threads()}, CPU ms per sample() call (median of {a.repeat})")
    print("| vocab | mix | per-row loop ms | batched ms | ratio |")
    print("|---|---|---|---|---|")
    for vocab in (32_000, 151_936):
        logits = torch.randn(a.rows, vocab, generator=torch.Generator().manual_seed(0))
        for name, kw in MIXES.items():
            params = SamplingParams(**kw)
            seqs = [Sequence(f"s{i}", [5], params) for i in range(a.rows)]
            generators = [torch.Generator().manual_seed(i) for i in range(a.rows)]
            sampler = Sampler(0)
            base = timed(lambda: per_row(logits, [params] * a.rows, generators), a.repeat)  # noqa: B023
            ours = timed(lambda: sampler.sample(logits, seqs), a.repeat)  # noqa: B023
            print(f"| {vocab:,} | {name} | {base:.1f} | {ours:.1f} | {base / ours:.2f}x |")


if __name__ == "__main__":
    main()
