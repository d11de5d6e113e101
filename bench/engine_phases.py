"""Where the offline-throughput time goes, engine against HF ``generate``, by phase, with a GEMM roofline.

    python -m bench.engine_phases --model llama-110m-dummy --threads 1

The workload of ``bench.engine_ops`` (64 prompts of 32..256 tokens, 32 output tokens, HF in left-padded batches
of 16), one round each, process CPU time throughout (steadier than wall time on a shared box):
(a) the engine: CPU time of ``ModelRunner.execute`` in steps that hold a prompt chunk (prefill or mixed) and in
    pure decode steps, and the rest of ``LLM.generate`` (scheduling, sampling, outputs);
(b) HF ``generate``: its prefill (up to the first logits processor call) and its decode iterations, and the
    padded prompt tokens it computes against the real ones;
(c) ``--all-logits``: HF again with ``logits_to_keep=0`` (logits for every prompt position, what transformers
    computed before it kept only the last one), to show what a large vocabulary costs that way;
(d) single-thread GEMM rates (GFLOP/s) of the model's projection shapes at M = 16 (HF's decode batch), 64 (the
    engine's) and 2048 (a prefill chunk), and the FLOP floor of the workload at those rates.
"""

from __future__ import annotations

import argparse
import time

import torch

from pdserve import LLM, SamplingParams
from pdserve.bench.engine_bench import load_hf, make_prompts


def engine_phases(llm: LLM, prompts, max_tokens: int) -> dict:
    runner = llm.engine.runner
    rec: list[tuple[int, bool, float]] = []
    execute = runner.execute

    def timed(items, layer_hook=None):
        c = time.process_time()
        out = execute(items, layer_hook)
        rec.append((sum(len(it.token_ids) for it in items), all(len(it.token_ids) == 1 for it in items),
                    time.process_time() - c))
        return out

    runner.execute = timed
    try:
        c = time.process_time()
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        total = time.process_time() - c
    finally:
        runner.execute = execute
    pre = [r for r in rec if not r[1]]
    dec = [r for r in rec if r[1]]
    return {"total": total, "prefill_steps": len(pre), "prefill_tokens": sum(r[0] for r in pre),
            "prefill": sum(r[2] for r in pre), "decode_steps": len(dec), "decode_rows": sum(r[0] for r in dec),
            "decode": sum(r[2] for r in dec)}


def hf_phases(model, prompts, max_tokens: int, batch: int, **kwargs) -> dict:
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.first: float | None = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.process_time()
            return scores

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=[])
    prefill = decode = 0.0
    padded = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(map(len, chunk))
            padded += len(chunk) * width
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            stamp = Stamp()
            c = time.process_time()
            model.generate(ids, attention_mask=mask, generation_config=cfg,
                           logits_processor=LogitsProcessorList([stamp]), **kwargs)
            prefill += stamp.first - c
            decode += time.process_time() - stamp.first
    return {"total": prefill + decode, "prefill": prefill, "decode": decode, "padded_tokens": padded}


def gemm_gflops(m: int, k: int, n: int, iters: int = 3) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    c = time.process_time()
    for _ in range(iters):
        torch.mm(a, b)
    return 2 * m * k * n * iters / (time.process_time() - c) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-110m-dummy")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--all-logits", action="store_true", help="also HF with logits for every prompt position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the engine's prefill chunk budget")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    llm = LLM(a.model, num_blocks=(a.num_prompts + 1) * (a.max_len + a.max_tokens) // 16 + 64,
              max_num_batched_tokens=a.max_num_batched_tokens)
    spec = llm.engine.runner.model.spec if llm.engine.runner.native is not None else None
    vocab = llm.engine.runner.geometry.vocab_size
    hf = load_hf(llm, "cpu")
    prompts = make_prompts(a.num_prompts, a.min_len, a.max_len, vocab, a.seed)
    llm.generate(make_prompts(2, 8, 8, vocab, a.seed + 2), SamplingParams(max_tokens=2, temperature=0))  # warm
    eng = engine_phases(llm, prompts, a.max_tokens)
    ref = hf_phases(hf, prompts, a.max_tokens, a.hf_batch)
    real = sum(map(len, prompts))
    print(f"model {a.model}, threads {torch.get_num_threads()}, {a.num_prompts} prompts of {a.min_len}..{a.max_len} "
          f"tokens ({real} in all), {a.max_tokens} out; process CPU seconds")
    print(f"engine  total {eng['total']:.2f}: prefill/mixed steps {eng['prefill_steps']} ({eng['prefill_tokens']} "
          f"tokens) {eng['prefill']:.2f}, decode steps {eng['decode_steps']} ({eng['decode_rows']} rows) "
          f"{eng['decode']:.2f}, rest {eng['total'] - eng['prefill'] - eng['decode']:.2f}")
    print(f"HF      total {ref['total']:.2f}: prefill {ref['prefill']:.2f} ({ref['padded_tokens']} padded tokens, "
          f"{ref['padded_tokens'] / real:.2f}x the real ones), decode {ref['decode']:.2f}")
    print(f"ratio (HF / engine): total {ref['total'] / eng['total']:.2f}x, prefill "
          f"{ref['prefill'] / eng['prefill']:.2f}x, decode {ref['decode'] / eng['decode']:.2f}x")
    if a.all_logits:
        full = hf_phases(hf, prompts, a.max_tokens, a.hf_batch, logits_to_keep=0)
        print(f"HF with logits for every prompt position: total {full['total']:.2f} (prefill {full['prefill']:.2f}), "
              f"{full['total'] / eng['total']:.2f}x the engine")
    if spec is None:
        return
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    shapes = {"qkv": (h, (spec.num_heads + 2 * spec.num_kv_heads) * d), "o": (spec.num_heads * d, h),
              "gate_up": (h, 2 * i), "down": (i, h)}
    body = {k: 2 * kk * n for k, (kk, n) in shapes.items()}  # FLOPs per token per layer
    rates = {m: {k: gemm_gflops(m, kk, n) for k, (kk, n) in shapes.items()} for m in (16, 64, 2048)}
    for m in rates:
        rates[m]["lm_head"] = gemm_gflops(m, h, vocab, 1)
        print(f"GEMM GFLOP/s at M={m}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates[m].items()))
    layers = spec.num_layers
    body_s = {m: layers * sum(body[k] / (rates[m][k] * 1e9) for k in body) for m in rates}  # s per token
    head_s = {m: 2 * h * vocab / (rates[m]["lm_head"] * 1e9) for m in rates}
    floor_pre = real * body_s[2048]
    floor_dec = a.num_prompts * a.max_tokens * (body_s[64] + head_s[64])
    print(f"FLOPs per token: body {layers * sum(body.values()) / 1e6:.1f} M, LM head {2 * h * vocab / 1e6:.1f} M")
    print(f"engine GEMM floor: prefill of the real prompt tokens at M=2048 rates {floor_pre:.2f} s + decode at "
          f"M=64 rates {floor_dec:.2f} s = {floor_pre + floor_dec:.2f} s -> at most "
          f"{ref['total'] / (floor_pre + floor_dec):.2f}x this run's HF; 4x needs <= {ref['total'] / 4:.2f} s")


if __name__ == "__main__":
    main()
