"""What structured outputs cost (engine.structured), against free text in the same run.

    python -m bench.structured_bench --threads 1

The offline engine on ``--model`` (default ``tiny-qwen3``: random weights, Qwen's 151,936-token vocabulary, built
locally) generates ``--prompts`` seeded completions of up to ``--max-tokens`` tokens, free and under three
constraints (a regex, a JSON schema, a list of choices). Figures: generated tokens per second of the whole
``generate`` call (best of ``--repeat``), the ratio to free text, and the mask's share (process CPU time of
``engine.structured.mask`` over the batch, per step, against the step). The constrained rows stop when their
grammar completes, so their token counts differ; tokens per second is the comparable figure.
"""

from __future__ import annotations

import argparse
import time

import torch

from pdserve import LLM, SamplingParams, StructuredOutputsParams
from pdserve.engine import structured

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["title", "year", "tags"], "additionalProperties": False}
CONSTRAINTS = {
    "free text": None,
    "regex [a-z ]{8,200}": StructuredOutputsParams(regex="[a-z ]{8,200}"),
    "JSON schema": StructuredOutputsParams(json=SCHEMA),
    "choice (3)": StructuredOutputsParams(choice=["positive", "negative", "neutral"]),
}


class MaskTimer:
    """Wraps ``structured.mask`` (as the sampler calls it) to add up its process CPU time."""

    def __init__(self):
        self.seconds = 0.0
        self.inner = structured.mask

    def __call__(self, *args, **kwargs):
        t0 = time.process_time()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.process_time() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-qwen3")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, num_blocks=512, async_output="off")
    prompts = [f"Request {i}: describe a film in a few words." for i in range(args.prompts)]
    timer = MaskTimer()
    structured.mask = timer  # the sampler calls it through the module
    print(f"{args.model}, {args.prompts} prompts, up to {args.max_tokens} tokens, seeded")
    print(f"{'constraint':<22} {'tokens':>7} {'tok/s':>8} {'vs free':>8} {'mask share':>11}")
    base = None
    for name, so in CONSTRAINTS.items():
        params = [SamplingParams(max_tokens=args.max_tokens, seed=i, ignore_eos=so is None, structured_outputs=so)
                  for i in range(args.prompts)]
        llm.generate(prompts[:2], params[:2])  # the grammar compiled, the tokenizer's llguidance view built
        best, tokens, share = 0.0, 0, 0.0
        for _ in range(args.repeat):
            timer.seconds = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            outs = llm.generate(prompts, params)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            if tokens / wall > best:
                best, share = tokens / wall, timer.seconds / cpu
        base = base or best
        print(f"{name:<22} {tokens:>7} {best:>8.1f} {best / base:>7.2f}x {share:>10.1%}")


if __name__ == "__main__":
    main()
