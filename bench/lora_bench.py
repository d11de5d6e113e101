"""LoRA cost: offline throughput of a batch mixing 4 adapters against base-only in the same run and engine, the
base-only throughput of an engine without LoRA enabled, and the adapter load and slot-swap times.

    python -m bench.lora_bench --model llama-110m-dummy --threads 1

Adapters are written in PEFT format (adapter_config.json + adapter_model.safetensors, random A and B on all seven
targets, rank ``--rank``) to a temporary directory; ``peft`` itself is not needed. Each round runs
``--num-prompts`` prompts of ``--prompt-len`` tokens with ``--max-tokens`` output tokens (no eos) once base-only
and once with the prompts spread round-robin over the 4 adapters, alternated; the best of ``--repeat`` rounds
counts. The prefix cache is off so every round does its full prefill. Throughput counts output tokens, per wall
second and per second of this process's CPU time (the steadier measure on a shared, loaded box at one thread).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdserve import LLM, SamplingParams

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(out: Path, dims, num_layers: int, rank: int, seed: int) -> str:
    """A PEFT LoRA directory with random A and B (std 0.02) for a model of these projection shapes."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for t in TARGETS:
            fan_in, fan_out = dims[t]
            mod = "self_attn" if t in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{mod}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
           "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return str(out)


def run(llm: LLM, prompts, params, loras) -> tuple[float, float]:
    """(output tokens per wall second, per second of this process's CPU time)."""
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, lora_name=loras)
    n = sum(len(o.token_ids) for o in outs)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-110m-dummy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-plain", action="store_true", help="skip the engine without LoRA enabled")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    common = dict(enable_prefix_caching=False, max_num_seqs=args.num_prompts)
    llm = LLM(args.model, enable_lora=True, max_loras=4, max_lora_rank=args.rank, **common)
    eng = llm.engine
    dims = eng.runner.lora_slots.dims
    names = [f"lora{i}" for i in range(4)]
    load_s = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter(Path(tmp) / n, dims.shapes, dims.num_layers, args.rank, i) for i, n in enumerate(names)]
        for name, path in zip(names, paths, strict=True):
            t0 = time.perf_counter()
            eng.load_adapter(name, path)
            load_s.append(time.perf_counter() - t0)
    slots = eng.runner.lora_slots
    swap_s = []
    for name in names:  # a swap: copy one adapter's host weights into its device slot
        adapter = eng.lora.adapters[name]
        slots.evict(adapter)
        t0 = time.perf_counter()
        slots.activate([adapter])
        if slots.device.type == "cuda":
            torch.cuda.synchronize()
        swap_s.append(time.perf_counter() - t0)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    vocab = eng.vocab_size

    def prompts():
        return [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]

    mixed_loras = [names[i % 4] for i in range(args.num_prompts)]
    run(llm, prompts()[:2], params, mixed_loras[:2])  # warm-up: every adapter's first swap, the buffers
    run(llm, prompts()[:2], params, None)
    base, mixed = [], []
    for _ in range(args.repeat):
        base.append(run(llm, prompts(), params, None))
        mixed.append(run(llm, prompts(), params, mixed_loras))
    plain = []
    if not args.no_plain:
        del llm, eng
        plain_llm = LLM(args.model, **common)
        run(plain_llm, prompts()[:2], params, None)
        plain = [run(plain_llm, prompts(), params, None) for _ in range(args.repeat)]
    print(f"model {args.model}, {args.num_prompts} prompts x {args.prompt_len} tokens -> {args.max_tokens} tokens, "
          f"rank {args.rank}, 4 adapters, {args.threads} thread(s), best of {args.repeat}")
    print(f"adapter load (parse + validate, host): median {statistics.median(load_s) * 1e3:.1f} ms, "
          f"max {max(load_s) * 1e3:.1f} ms")
    print(f"slot swap (host -> device slot copy): median {statistics.median(swap_s) * 1e3:.2f} ms")
    for i, clock in enumerate(("wall", "cpu")):
        b, m = max(r[i] for r in base), max(r[i] for r in mixed)
        print(f"[{clock}] base-only, LoRA enabled:  {b:8.1f} tok/s")
        print(f"[{clock}] mixed 4 adapters:         {m:8.1f} tok/s   ratio mixed/base {m / b:.3f}")
        if plain:
            p = max(r[i] for r in plain)
            print(f"[{clock}] base-only, LoRA disabled: {p:8.1f} tok/s   ratio enabled/disabled (base-only) {b / p:.3f}")


if __name__ == "__main__":
    main()
