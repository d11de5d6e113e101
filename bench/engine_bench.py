"""Offline engine throughput against HF generate, same model and prompts, same run.

    python -m bench.engine_bench --model tiny --num-prompts 64 --max-tokens 64

Prints output tokens/s for HF ``generate`` (greedy, left-padded batches of --hf-batch) and for pdserve's
``LLM.generate`` (all prompts at once, continuous batching), their ratio, and the engine's decode step time
at batch 1 and at full batch.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from engine import LLM, SamplingParams


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_throughput(model, prompts, max_tokens: int, batch: int, device: str) -> tuple[float, int]:
    """HF generate on the very same weights (works for dummy presets, which have no files on disk)."""
    from transformers import GenerationConfig

    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:
        model.config._attn_implementation = "sdpa"
    cfg = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=2)
    total = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(ids, attention_mask=mask, generation_config=cfg)
            total += (out.shape[1] - width) * len(chunk)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return total / (time.perf_counter() - t0), total


def step_ms(llm: LLM, batch: int, prompt_len: int, steps: int = 20) -> float:
    """Mean decode step time with ``batch`` running sequences."""
    eng = llm.engine
    params = SamplingParams(max_tokens=steps + 5, temperature=0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"step-{batch}-{i}", [5 + i % 200] * prompt_len, params)
    while any(s.in_prefill for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    ms = (time.perf_counter() - t0) / steps * 1e3
    for i in range(batch):
        eng.abort(f"step-{batch}-{i}")
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()

    llm = LLM(a.model, device=a.device, num_blocks=a.num_blocks, max_num_seqs=max(64, a.num_prompts),
              max_num_batched_tokens=4096)
    vocab = min(259, llm.engine.vocab_size)
    prompts = make_prompts(a.num_prompts, a.min_len, a.max_len, vocab, a.seed)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    pd_s = time.perf_counter() - t0
    pd_tokens = sum(len(o.token_ids) for o in outs)
    pd_tps = pd_tokens / pd_s
    s1 = step_ms(llm, 1, 128)
    sfull = step_ms(llm, min(64, a.num_prompts), 128)
    hf_tps, hf_tokens = hf_throughput(llm.engine.runner.model, prompts, a.max_tokens, a.hf_batch, a.device)
    res = {
        "model": a.model, "device": a.device, "num_prompts": a.num_prompts, "len": [a.min_len, a.max_len],
        "max_tokens": a.max_tokens, "hf_batch": a.hf_batch,
        "hf_generate_tok_s": hf_tps, "pdserve_tok_s": pd_tps, "ratio": pd_tps / hf_tps,
        "step_ms_batch1": s1, f"step_ms_batch{min(64, a.num_prompts)}": sfull,
    }
    print(f"model {a.model} on {a.device}: {a.num_prompts} prompts of {a.min_len}..{a.max_len} tokens, "
          f"{a.max_tokens} output tokens each")
    print(f"{'system':32} {'output tok/s':>12} {'ratio':>7}")
    print(f"{'HF generate (batch ' + str(a.hf_batch) + ')':32} {hf_tps:12.1f} {1.0:7.2f}")
    print(f"{'pdserve LLM.generate':32} {pd_tps:12.1f} {pd_tps / hf_tps:7.2f}")
    print(f"decode step: {s1:.2f} ms at batch 1, {sfull:.2f} ms at batch {min(64, a.num_prompts)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
