"""Offline engine throughput against HF generate: same checkpoint, same prompts, same run.

    python -m bench.engine_bench --model tiny --num-prompts 64 --min-len 16 --max-len 256 --max-tokens 64

Measures, in one process and in this order:

(a) HF ``generate``: greedy, left-padded batches of ``--hf-batch`` prompts, on a model loaded with
    ``AutoModelForCausalLM.from_pretrained`` from the checkpoint directory the engine loaded (dummy presets
    have no weights on disk: HF builds the model from that directory's config and takes the engine's
    random weights, so both run the very same numbers);
(b) pdserve ``LLM.generate`` with every prompt submitted at once (continuous batching, paged KV);
(c) the engine's decode step time (ms per step) at batch 1 and at a full batch of ``--num-prompts``;
(d) per batch size in ``--step-batches`` (default 1 and 16): the engine's decode step time next to HF
    ``generate``'s time per decoded token at the same batch and prompt length, measured alternately
    ``--repeat`` times (medians, ranges and their ratio). Both are medians of ``--step-iters`` single
    iterations, prefill excluded (HF's are stamped by a pass-through logits processor). An engine step does
    the same work as one HF decode iteration (one new token for every sequence), so the ratio shows the
    engine's per-step overhead relative to HF's. ``--only-steps`` skips (a)-(c).

    python -m bench.engine_bench --model llama-110m-dummy --only-steps --threads 1 --repeat 5

Both systems produce exactly ``--max-tokens`` tokens per prompt (pdserve: ignore_eos; HF: no eos id), and
the script reports how many prompts got identical greedy tokens from both as a sanity check (left padding
changes HF's float rounding, so an occasional near-tie may differ; on the tiny preset all 64 match).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from pdserve import LLM, SamplingParams


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_hf(llm: LLM, device: str):
    """transformers' own model class and attention (sdpa) from the engine's checkpoint directory."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    path = llm.engine.runner.model_path
    dtype = llm.engine.runner.dtype
    if any(Path(path).glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:  # a dummy preset: config only on disk; copy the engine's randomly initialised weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        model.load_state_dict(llm.engine.runner.model.state_dict())
    return model.to(device).eval()


def hf_generate(model, prompts, max_tokens: int, batch: int, device: str) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    # no eos at all (an empty list; None would fall back to the model's): the same work as ignore_eos
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=[])
    outs: list[list[int]] = []
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            gen = model.generate(ids, attention_mask=mask, generation_config=cfg)
            outs += gen[:, width:].tolist()
    sync(device)
    return time.perf_counter() - t0, outs


def pdserve_generate(llm: LLM, prompts, max_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(device)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


STEP_SLACK = 64


def decode_step_ms(llm: LLM, batch: int, prompt_len: int, vocab: int, steps: int, device: str) -> float:
    """Median time of one engine step while ``batch`` sequences decode (prefill excluded)."""
    eng = llm.engine
    rng = random.Random(batch)
    # long enough that sequences whose prefill ended in an early chunk still run through every timed step
    params = SamplingParams(max_tokens=steps + STEP_SLACK, temperature=0, ignore_eos=True)
    rids = [f"step-{batch}-{i}" for i in range(batch)]
    for rid in rids:
        eng.add_request(rid, [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
    while eng.scheduler.waiting or any(s.in_prefill for s in eng.scheduler.running):
        eng.step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        eng.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    assert len(eng.scheduler.running) == batch, "every sequence decoded in every timed step"
    for rid in rids:
        eng.abort(rid)
    eng.check_integrity()
    return statistics.median(times) * 1e3


def hf_decode_ms(model, batch: int, prompt_len: int, vocab: int, steps: int, device: str) -> float:
    """Median time of one HF ``generate`` decode iteration with ``batch`` prompts of ``prompt_len`` tokens.

    A pass-through logits processor stamps the clock once per iteration; the gaps between stamps are whole
    iterations (forward, logits processing, token selection, stopping checks), prefill excluded. Medians of
    per-iteration times, like the engine's, shrug off bursts of load from other processes.
    """
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            sync(device)
            self.times.append(time.perf_counter())
            return scores

    rng = random.Random(batch)
    ids = torch.tensor([[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)], device=device)
    stamp = Stamp()
    cfg = GenerationConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, pad_token_id=0,
                           eos_token_id=[])
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                       logits_processor=LogitsProcessorList([stamp]))
    gaps = [b - a for a, b in zip(stamp.times[:-1], stamp.times[1:], strict=True)]
    assert len(gaps) == steps, (len(gaps), steps)
    return statistics.median(gaps) * 1e3


def step_comparison(llm: LLM, hf, batches: list[int], a: argparse.Namespace, vocab: int) -> dict:
    """Engine decode step vs HF per-token decode, alternated ``a.repeat`` times per batch size."""
    runs: dict[int, dict[str, list[float]]] = {b: {"engine": [], "hf": []} for b in batches}
    for b in batches:  # warm-up
        decode_step_ms(llm, b, a.step_prompt_len, vocab, 2, a.device)
    for _ in range(a.repeat):
        for b in batches:
            runs[b]["hf"].append(hf_decode_ms(hf, b, a.step_prompt_len, vocab, a.step_iters, a.device))
            runs[b]["engine"].append(decode_step_ms(llm, b, a.step_prompt_len, vocab, a.step_iters, a.device))
    out = {}
    for b in batches:
        eng, ref = runs[b]["engine"], runs[b]["hf"]
        out[b] = {
            "engine_step_ms": statistics.median(eng), "engine_step_ms_runs": eng,
            "hf_ms_per_token": statistics.median(ref), "hf_ms_per_token_runs": ref,
            "ratio": statistics.median(eng) / statistics.median(ref),
        }
    return out


def print_step_comparison(res: dict, a: argparse.Namespace) -> None:
    print(f"decode, {a.step_prompt_len}-token prompts, {a.step_iters} steps per run, median [range] of {a.repeat} "
          f"alternated runs:")
    print()
    print("| batch | engine step ms | HF generate ms/token | engine / HF |")
    print("|---|---|---|---|")
    for b, r in res.items():
        eng, ref = r["engine_step_ms_runs"], r["hf_ms_per_token_runs"]
        print(f"| {b} | {r['engine_step_ms']:.2f} [{min(eng):.2f}..{max(eng):.2f}] | "
              f"{r['hf_ms_per_token']:.2f} [{min(ref):.2f}..{max(ref):.2f}] | {r['ratio']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-blocks", type=int, default=0, help="0: enough for every prompt at once")
    ap.add_argument("--step-prompt-len", type=int, default=128)
    ap.add_argument("--step-iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of (a) and (b), alternated; medians reported")
    ap.add_argument("--step-batches", default="1,16",
                    help="batch sizes for the engine-step vs HF-per-token comparison (comma separated; empty: skip)")
    ap.add_argument("--only-steps", action="store_true", help="run only the step comparison (d)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    block_size = 16
    step_batches = [int(b) for b in a.step_batches.split(",") if b.strip()]
    max_seqs = max([a.num_prompts, *step_batches])
    need = a.num_prompts * ((a.max_len + a.max_tokens + block_size - 1) // block_size)
    step_len = a.step_prompt_len + a.step_iters + STEP_SLACK
    step_need = max_seqs * ((step_len + block_size - 1) // block_size)
    num_blocks = a.num_blocks or max(need, step_need) + 16
    llm = LLM(a.model, device=a.device, dtype=a.dtype, num_blocks=num_blocks, max_num_seqs=max_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens, block_size=block_size)
    vocab = min(259, llm.engine.vocab_size)  # byte tokens: the tokenizer's real vocabulary
    prompts = make_prompts(a.num_prompts, a.min_len, a.max_len, vocab, a.seed)
    hf = load_hf(llm, a.device)
    head = (f"model {a.model} on {a.device} ({str(llm.engine.runner.dtype).removeprefix('torch.')}, "
            f"{torch.get_num_threads()} torch threads)")

    if a.only_steps:
        steps = step_comparison(llm, hf, step_batches, a, vocab)
        print(head)
        print()
        print_step_comparison(steps, a)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"model": a.model, "device": a.device, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "step_prompt_len": a.step_prompt_len,
                           "step_iters": a.step_iters, "repeat": a.repeat, "steps": steps}, f, indent=2)
        return

    # warm-up: allocator, kernels, lazy imports
    hf_generate(hf, prompts[:2], 2, a.hf_batch, a.device)
    pdserve_generate(llm, prompts[:2], 2, a.device)

    hf_runs, pd_runs = [], []
    for _ in range(a.repeat):  # alternate, so drifting background load hits both alike
        hf_s, hf_out = hf_generate(hf, prompts, a.max_tokens, a.hf_batch, a.device)
        pd_s, pd_out = pdserve_generate(llm, prompts, a.max_tokens, a.device)
        llm.engine.check_integrity()
        hf_runs.append(hf_s)
        pd_runs.append(pd_s)
    hf_s, pd_s = statistics.median(hf_runs), statistics.median(pd_runs)
    hf_tokens, pd_tokens = sum(map(len, hf_out)), sum(map(len, pd_out))
    assert hf_tokens == pd_tokens == a.num_prompts * a.max_tokens, (hf_tokens, pd_tokens)
    same = sum(h == p for h, p in zip(hf_out, pd_out, strict=True))
    hf_tps, pd_tps = hf_tokens / hf_s, pd_tokens / pd_s
    step1 = decode_step_ms(llm, 1, a.step_prompt_len, vocab, a.step_iters, a.device)
    stepn = decode_step_ms(llm, a.num_prompts, a.step_prompt_len, vocab, a.step_iters, a.device)
    steps = step_comparison(llm, hf, step_batches, a, vocab) if step_batches else {}

    res = {
        "model": a.model, "device": a.device, "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "num_prompts": a.num_prompts, "prompt_len": [a.min_len, a.max_len], "max_tokens": a.max_tokens,
        "hf_batch": a.hf_batch, "repeat": a.repeat, "hf_s": hf_s, "pdserve_s": pd_s,
        "hf_s_runs": hf_runs, "pdserve_s_runs": pd_runs,
        "hf_tok_s": hf_tps, "pdserve_tok_s": pd_tps, "ratio": pd_tps / hf_tps,
        "identical_greedy_outputs": same, "step_ms_batch1": step1, "step_ms_full_batch": stepn,
        "step_prompt_len": a.step_prompt_len, "steps": steps,
    }
    print(f"{head}: {a.num_prompts} prompts of {a.min_len}..{a.max_len} tokens, {a.max_tokens} output tokens "
          f"each; median of {a.repeat} runs")
    print()
    total = a.num_prompts * a.max_tokens
    print("| system | wall s (median) | output tok/s | range tok/s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| HF generate (greedy, left-padded batches of {a.hf_batch}) | {hf_s:.2f} | {hf_tps:.1f} | "
          f"{total / max(hf_runs):.0f}..{total / min(hf_runs):.0f} | 1.00 |")
    print(f"| pdserve LLM.generate (all {a.num_prompts} at once) | {pd_s:.2f} | {pd_tps:.1f} | "
          f"{total / max(pd_runs):.0f}..{total / min(pd_runs):.0f} | {pd_tps / hf_tps:.2f} |")
    print()
    print(f"decode step ({a.step_prompt_len}-token prompts): {step1:.2f} ms at batch 1, "
          f"{stepn:.2f} ms at batch {a.num_prompts}")
    print(f"identical greedy outputs (HF vs pdserve): {same}/{a.num_prompts}")
    if steps:
        print()
        print_step_comparison(steps, a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
