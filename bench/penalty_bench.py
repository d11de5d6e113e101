"""What penalties cost a sampling step (engine.penalties), against the same step without them, in the same run.

    python -m bench.penalty_bench --threads 1

A batch of ``--rows`` requests, each with a ``--prompt``-token prompt and ``--output`` tokens generated, over a
151,936-token vocabulary (Qwen's). Three figures per mix, process CPU time per ``Sampler.sample`` call (median of
``--repeat``):
- plain: no penalty (the baseline);
- batched: the penalties as the engine applies them (one pass over the batch);
- per-row: the same penalties applied a row at a time (a bincount and a gather / scatter per row, the way a
  per-request logits processor works), then the same sampler.
Ratios: batched / plain (the penalties' cost) and per-row / batched.
"""

from __future__ import annotations

import argparse
import random

import torch

from pdserve import SamplingParams
from pdserve.bench.sampler_bench import timed
from pdserve.engine import penalties
from pdserve.engine.sampler import Sampler
from pdserve.engine.sequence import Sequence

VOCAB = 151_936
MIXES = {
    "frequency + presence": dict(frequency_penalty=0.5, presence_penalty=0.5),
    "repetition": dict(repetition_penalty=1.1),
    "all three": dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1),
}


def per_row(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The baseline: each row's penalties on its own."""
    out = logits.clone()
    for i, s in enumerate(seqs):
        p, row = s.params, out[i]
        counts = torch.bincount(torch.tensor(s.output_token_ids), minlength=VOCAB).to(row.dtype)
        if p.repetition_penalty != 1:
            seen = torch.unique(torch.tensor(s.prompt_token_ids + s.output_token_ids))
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    logits = torch.randn(args.rows, VOCAB, generator=torch.Generator().manual_seed(0))

    def batch(**kw) -> list[Sequence]:
        seqs = []
        for i in range(args.rows):
            s = Sequence(f"r{i}", [rng.randrange(VOCAB) for _ in range(args.prompt)],
                         SamplingParams(temperature=0.8, seed=i, **kw))
            s.output_token_ids = [rng.randrange(VOCAB) for _ in range(args.output)]
            seqs.append(s)
        return seqs

    plain_seqs, sampler = batch(), Sampler(0)
    plain = timed(lambda: sampler.sample(logits, plain_seqs), args.repeat)
    print(f"{args.rows} rows, prompt {args.prompt}, output {args.output}, vocab {VOCAB}; plain sample: "
          f"{plain:.1f} ms")
    print(f"{'mix':<22} {'batched ms':>10} {'per-row ms':>10} {'batched/plain':>14} {'per-row/batched':>16}")
    for name, kw in MIXES.items():
        seqs = batch(**kw)
        fast = timed(lambda s=seqs: sampler.sample(logits, s), args.repeat)
        slow = timed(lambda s=seqs: sampler.sample(per_row(logits, s), plain_seqs), args.repeat)
        want = penalties.apply(logits, seqs, set())
        torch.testing.assert_close(per_row(logits, seqs), want)  # the baseline computes the same logits
        print(f"{name:<22} {fast:>10.1f} {slow:>10.1f} {fast / plain:>13.2f}x {slow / fast:>15.2f}x")


if __name__ == "__main__":
    main()
