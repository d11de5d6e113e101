"""ATen ops per generated token per layer, and offline throughput, of the engine against HF ``generate`` in the
same run, with their ratios.

    python -m bench.engine_ops --model llama-110m-dummy --threads 2

(a) ops/token/layer at batch 1, counted from outside with a TorchDispatchMode: the ops of generating K+1 tokens
    minus those of generating 1, divided by K and the layer count; for the engine (``--model-impl``, default
    auto: native for the Llama/Qwen/Mistral families) and for HF ``generate`` on the same checkpoint and weights;
(b) offline throughput: ``--num-prompts`` prompts of ``--min-len``..``--max-len`` tokens, ``--max-tokens``
    output tokens each (no eos), HF ``generate`` in left-padded batches of ``--hf-batch`` and pdserve
    ``LLM.generate`` with every prompt submitted at once; the best of ``--repeat`` rounds each, alternated, each
    round on prompts of its own (the engine's prefix cache would otherwise skip later rounds' prefills). Wall
    time and this process's CPU time are both reported: on a shared, loaded box the CPU time (at one thread) is
    the steadier measure of the work each side does.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pdserve.bench.engine_bench import hf_generate, load_hf, make_prompts, pdserve_generate
from pdserve.engine import LLM, SamplingParams


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def engine_ops(llm: LLM, prompt: list[int], k: int, num_layers: int) -> tuple[float, collections.Counter]:
    def count(n):
        with OpCounter() as c:
            llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return c.ops

    count(2)
    diff = count(k + 1)
    diff.subtract(count(1))
    return sum(diff.values()) / k / num_layers, diff


def hf_ops(model, prompt: list[int], k: int, num_layers: int) -> float:
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])

    def count(n):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=[])
        with torch.inference_mode(), OpCounter() as c:
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return sum(c.ops.values())

    count(2)
    return (count(k + 1) - count(1)) / k / num_layers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-110m-dummy")
    p.add_argument("--model-impl", default="auto", choices=["auto", "native", "hf"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="the engine with compile=True (engine.native.compiled)")
    p.add_argument("--ops-tokens", type=int, default=16, help="K in the ops count")
    p.add_argument("--num-prompts", type=int, default=64, help="0: the ops count only")
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    # async_output off: a TorchDispatchMode sees only its own thread's ops, and the forward must run on this one
    llm = LLM(a.model, model_impl=a.model_impl, compile=a.compile, async_output="off",
              num_blocks=(a.num_prompts + 1) * (a.max_len + a.max_tokens) // 16 + 64)
    runner = llm.engine.runner
    layers, vocab = runner.geometry.num_layers, runner.geometry.vocab_size
    hf = load_hf(llm, "cpu")
    print(f"model {a.model} ({runner.model_impl}{', compiled' if a.compile else ''}, {layers} layers), "
          f"threads {torch.get_num_threads()}")
    if a.compile:  # torch.compile does not run under a TorchDispatchMode: the count is of the eager engine
        print("ops/token/layer: not counted under --compile (run without it)")
    else:
        prompt = make_prompts(1, 48, 48, vocab, a.seed + 1)[0]
        ops_engine, by_op = engine_ops(llm, prompt, a.ops_tokens, layers)
        ops_hf = hf_ops(hf, prompt, a.ops_tokens, layers)
        print(f"ops/token/layer (batch 1): engine {ops_engine:.2f}  HF generate {ops_hf:.2f}  "
              f"ratio {ops_engine / ops_hf:.3f}")
        per_layer = {k: round(v / a.ops_tokens / layers, 2) for k, v in by_op.most_common(12) if v}
        print(f"  engine ops per token per layer, by op: {per_layer}")
    if not a.num_prompts:
        return
    num_out = a.num_prompts * a.max_tokens
    best_hf = best_pd = cpu_hf = cpu_pd = float("inf")
    hf_out = pd_out = None
    pdserve_generate(llm, make_prompts(2, 8, 8, vocab, a.seed + 2), 2, "cpu")  # warm
    for i in range(a.repeat):
        prompts = make_prompts(a.num_prompts, a.min_len, a.max_len, vocab, a.seed + 1000 * i)
        c = time.process_time()
        t, hf_out = hf_generate(hf, prompts, a.max_tokens, a.hf_batch, "cpu")
        best_hf, cpu_hf = min(best_hf, t), min(cpu_hf, time.process_time() - c)
        c = time.process_time()
        t, pd_out = pdserve_generate(llm, prompts, a.max_tokens, "cpu")
        best_pd, cpu_pd = min(best_pd, t), min(cpu_pd, time.process_time() - c)
    same = sum(x == y for x, y in zip(hf_out, pd_out, strict=True))
    print(f"offline throughput, {a.num_prompts} prompts of {a.min_len}..{a.max_len} tokens, {a.max_tokens} out: "
          f"engine {num_out / best_pd:.1f} tok/s  HF generate (left-padded batches of {a.hf_batch}) "
          f"{num_out / best_hf:.1f} tok/s  ratio {best_hf / best_pd:.2f}x  (identical greedy outputs {same}/{len(prompts)})")
    print(f"  process CPU time: engine {cpu_pd:.2f} s  HF generate {cpu_hf:.2f} s  ratio {cpu_hf / cpu_pd:.2f}x")


if __name__ == "__main__":
    main()
