"""Async output processing (engine ``async_output``) against the synchronous step, in the same run.

    python -m bench.overlap_bench --model tiny-chat --threads 1

Two engines on one model, one with ``async_output='on'`` (a step's outputs, i.e. detokenized text, stop strings
and logprob dicts, are made after its successor's forward and sampling are queued and before their tokens are
read back) and one with it off, run the same offline batch in alternating rounds. The figure is wall-clock output
tokens per second (median of ``--rounds``), with the process CPU seconds. Every round checks that both engines
produced the same tokens and text (greedy and seeded rows; stop strings end some requests early, which exercises
the dropped row of a request a stop string ends).

Where it pays: on a GPU, where queueing the forward returns at once and the output work runs while the device
computes. On CPU the forward runs as it is queued, so only the order changes and the ratio is ~1.0x (an earlier
version ran the forward on a second thread: 0.95-0.99x, because the forward and the output work took turns on
the GIL). ``bench/gpu_check.py`` runs this comparison on CUDA.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from pdserve import LLM, SamplingParams


def workload(n: int, max_tokens: int, logprobs: int | None, seed: int) -> tuple[list[str], list[SamplingParams]]:
    rng = random.Random(seed)
    words = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
    prompts, params = [], []
    for i in range(n):
        prompts.append(" ".join(rng.choice(words) for _ in range(rng.randint(8, 48))))
        kind = i % 3
        params.append(SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs,
            temperature=0.0 if kind == 0 else 0.8, seed=None if kind == 0 else 1000 + i,
            stop=["the end", "zz"] + (["e"] if kind == 2 and i % 2 else []),
        ))
    return prompts, params


def run(llm: LLM, prompts, params) -> tuple[float, float, list, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, [(o.token_ids, o.text, o.finish_reason) for o in outs], sum(len(o.token_ids) for o in outs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-chat")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--logprobs", type=int, default=None, help="top logprobs per token (more output work)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts, params = workload(a.num_prompts, a.max_tokens, a.logprobs, 0)
    engines = {"async": LLM(a.model, async_output="on"), "sync": LLM(a.model, async_output="off")}
    for llm in engines.values():  # warm up: first-step allocations, lazy imports, the forward thread
        llm.generate(prompts[:4], params[:4])
    walls: dict[str, list[float]] = {k: [] for k in engines}
    cpus: dict[str, list[float]] = {k: [] for k in engines}
    tokens = 0
    for r in range(a.rounds):
        results = {}
        for name in (("async", "sync") if r % 2 == 0 else ("sync", "async")):
            wall, cpu, results[name], tokens = run(engines[name], prompts, params)
            walls[name].append(wall)
            cpus[name].append(cpu)
        if results["async"] != results["sync"]:
            raise SystemExit(f"round {r}: async and sync outputs differ")
    print(f"model {a.model}, {a.num_prompts} prompts, {tokens} output tokens per round, logprobs {a.logprobs}, "
          f"threads {a.threads or torch.get_num_threads()}, {a.rounds} rounds, outputs identical every round")
    for name in engines:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        print(f"  {name:5s}: {tokens / w:8.1f} tok/s wall (median {w:.3f} s), {c:.3f} CPU s")
    ratio = statistics.median(walls["sync"]) / statistics.median(walls["async"])
    print(f"  async / sync throughput (wall): {ratio:.2f}x")


if __name__ == "__main__":
    main()
