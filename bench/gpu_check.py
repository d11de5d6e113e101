"""One-shot GPU check of the Triton attention backend: kernel correctness, greedy parity, decode speed.

    python -m bench.gpu_check                       # on a CUDA machine: all of it, a few minutes on an H100
    python -m bench.gpu_check --no-hf-compile       # skip the torch.compile'd HF baseline (slow to compile)
    python -m bench.gpu_check --json out.json       # also write the numbers

On a CUDA machine it runs, in this order:

1. kernels: ``engine.kernels.check`` cases (fp32 and bf16, MHA/GQA, block sizes 4 and 16, mixed decode and
   prefill-with-prefix batches, split-K, sliding window, softcap) plus Llama-1B-shaped bf16 cases, each as
   the relative error of the Triton output against ``torch_paged_attention``; and the attention time of
   both backends on decode batches (``triton.testing.do_bench``);
2. parity: greedy tokens of the engine (backend torch, then triton) against HF transformers (sdpa, the
   engine's own weights) on ``--model`` (default ``llama-1b-dummy``, bf16). Reported per prompt: how many
   leading tokens agree, and where they part, HF's top-2 logit margin at that step (bf16 near-ties are
   where random-weight models part; a large margin there would be a real bug);
3. speed: batch-1 decode time per token of the engine with each backend (median ``engine.step()`` time),
   HF ``generate`` with its dynamic cache, and HF ``generate(cache_implementation="static")``, which
   transformers compiles with torch.compile on CUDA;
4. overlap: offline throughput with ``async_output`` on against off (bench/overlap_bench.py's workload:
   ``--overlap-prompts`` prompts, greedy and seeded rows, stop strings, 5 logprobs), alternating rounds in one
   process, with how many requests' outputs are identical (bf16 near-ties may part where batches differ).

Without CUDA only the kernel check runs, under Triton's interpreter (TRITON_INTERPRET=1, in a child
process), and the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _kernel_rows(results: list[dict]) -> list[list]:
    return [
        [r["name"], r["dtype"], f"{r['rel_err']:.1e}", f"{r['rel_err_fp32']:.1e}", f"{r['tol']:.0e}",
         "ok" if r["ok"] else "**FAIL**"]
        for r in results
    ]


KERNEL_HEADER = ["case", "dtype", "rel err vs torch ref", "rel err vs fp32 ref", "tol", ""]


def cpu_interpreted(args) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.engine.kernels.check", "--device", "cpu", "--json"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    if proc.returncode not in (0, 1):
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit("kernel check failed to run")
    res = json.loads(proc.stdout)
    print("No CUDA device: kernel check only, on CPU through Triton's interpreter (TRITON_INTERPRET=1).")
    print("Parity with HF and decode timings need a CUDA machine.\n")
    print(_table(KERNEL_HEADER, _kernel_rows(res["cases"])))
    print(f"\nnegative control (sliding window dropped): rel err {res['negative_rel_err']:.2f} (must be large)")
    return {"mode": "cpu-interpreter", **res}


# ---- CUDA --------------------------------------------------------------------------------------------


def llama1b_cases():
    from pdserve.engine.kernels.check import Case

    decode = tuple((n, 1) for n in (1, 15, 16, 17, 255, 1000, 2047, 4096))
    mixed = ((300, 300), (40, 1), (700, 77), (1025, 1), (64, 64), (513, 1))
    return (
        Case("llama1b_bf16_decode8", 32, 8, 64, 16, decode, dtype="bfloat16"),
        Case("llama1b_bf16_decode8_split8", 32, 8, 64, 16, decode, dtype="bfloat16", num_splits=8),
        Case("llama1b_bf16_mixed", 32, 8, 64, 16, mixed, dtype="bfloat16"),
        Case("qwen_like_bf16_hd128_window", 16, 2, 128, 16, mixed, dtype="bfloat16", sliding_window=256),
        Case("gemma_like_bf16_softcap", 8, 4, 256, 16, mixed, dtype="bfloat16", softcap=50.0),
    )


def kernel_check(device: str) -> list[dict]:
    from pdserve.engine.kernels.check import CASES, run_cases

    return run_cases(CASES + llama1b_cases(), device=device)


def attention_timings(device: str) -> list[dict]:
    """Per-call attention time (one layer) of both backends on Llama-1B-shaped bf16 decode batches."""
    import triton.testing

    from pdserve.engine.attention import torch_paged_attention
    from pdserve.engine.kernels.check import Case, build
    from pdserve.engine.kernels.triton_attention import triton_paged_attention

    rows = []
    for batch, ctx in ((1, 128), (1, 2048), (32, 512), (64, 2048)):
        case = Case(f"decode b{batch} ctx{ctx}", 32, 8, 64, 16, tuple((ctx, 1) for _ in range(batch)), "bfloat16")
        call_args = (*build(case, device), None, None)  # cache, meta, q, scaling, sliding_window, softcap
        res = {"batch": batch, "context": ctx}
        for name, fn in (("torch", torch_paged_attention), ("triton", triton_paged_attention)):
            res[name] = triton.testing.do_bench(lambda fn=fn, a=call_args: fn(*a)) * 1e3
        rows.append(res)
    return rows


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [16, 77, 200, 513, 1000, 33, 128, 300][:n]
    prompts = [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]
    # two more sharing a long prefix with prompt 2 (run in a second wave: prefill on top of cached blocks)
    prompts += [prompts[2][:160] + [rng.randrange(3, vocab) for _ in range(k)] for k in (9, 50)]
    return prompts


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _hf_model(llm, device: str, attn: str = "sdpa"):
    """transformers' own model and attention with the engine's weights (dummy presets have none on disk)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    runner = llm.engine.runner
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(runner.model_path), dtype=runner.dtype, attn_implementation=attn
    )
    model.load_state_dict(runner.model.state_dict())
    return model.to(device).eval()


def _hf_greedy(model, prompt: list[int], max_tokens: int, device: str, **gen_kw) -> list[int]:
    import torch
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=[], **gen_kw)
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(prompt) :].tolist()


def _margin(model, tokens: list[int], device: str) -> float:
    """HF's top-2 logit gap for the next token after ``tokens``."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([tokens], device=device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return (top[0] - top[1]).item()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _engine_greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from pdserve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    first = llm.generate(prompts[:-2], params)
    second = llm.generate(prompts[-2:], params)  # prefix-cache hits on prompt 2's blocks
    if not all(o.num_cached_tokens > 0 for o in second):
        print("warning: the second wave did not hit the prefix cache", file=sys.stderr)
    return [o.token_ids for o in first + second]


def _decode_ms_per_token(llm, prompt: list[int], steps: int) -> float:
    """Median engine.step() time at batch 1 once the prompt is prefilled."""
    from pdserve import SamplingParams

    eng = llm.engine
    rid = f"timing-{time.monotonic_ns()}"
    eng.add_request(rid, prompt, SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    while eng.scheduler.waiting or any(s.in_prefill for s in eng.scheduler.running):
        eng.step()
    for _ in range(4):  # warm: kernels compiled, allocator settled
        eng.step()
    times = []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        eng.step()
        _sync()
        times.append(time.perf_counter() - t0)
    eng.abort(rid)
    return statistics.median(times) * 1e3


def _hf_ms_per_token(model, prompt: list[int], steps: int, device: str, **kw) -> float:
    """(time for 1 + steps new tokens - time for 1) / steps, after a warm-up of both."""

    def run(n):
        _sync()
        t0 = time.perf_counter()
        _hf_greedy(model, prompt, n, device, **kw)
        _sync()
        return time.perf_counter() - t0

    for n in (1, 1 + steps):  # warm-up (and compile, for the static cache)
        run(n)
    one = statistics.median(run(1) for _ in range(3))
    full = statistics.median(run(1 + steps) for _ in range(3))
    return (full - one) / steps * 1e3


def cuda_check(args) -> dict:
    import torch

    from pdserve import LLM
    from pdserve.engine.kernels.triton_attention import TRITON_AVAILABLE

    if not TRITON_AVAILABLE:
        raise SystemExit("triton is not installed: pip install triton")
    device = "cuda"
    res: dict = {"mode": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers
    import triton

    res["triton"], res["transformers"] = triton.__version__, transformers.__version__
    print(f"{res['gpu']}, torch {res['torch']}, triton {res['triton']}, transformers {res['transformers']}, "
          f"{platform.python_version()}\n")

    # 1. kernels
    t0 = time.perf_counter()
    from pdserve.engine.model_runner import resolve_attention_backend

    res["auto_backend"] = resolve_attention_backend("auto", torch.device(device))
    res["kernels"] = kernel_check(device)
    print(f"## Kernel vs torch reference ({time.perf_counter() - t0:.0f} s incl. compiles; "
          f"attention_backend=auto picks {res['auto_backend']!r} here)\n")
    print(_table(KERNEL_HEADER, _kernel_rows(res["kernels"])))
    res["attention_us"] = attention_timings(device)
    print("\n## Attention, one layer, Llama-1B shapes (32 q / 8 kv heads x 64, bf16, block 16), us per call\n")
    print(_table(["batch", "context", "torch", "triton", "speedup"],
                 [[r["batch"], r["context"], f"{r['torch']:.1f}", f"{r['triton']:.1f}",
                   f"{r['torch'] / r['triton']:.2f}x"] for r in res["attention_us"]]))

    # 2. parity, 3. speed: one engine per backend (the second takes the first's weights), one HF model
    prompts = _prompts(args.num_prompts, 32000, args.seed)
    timing_prompt = [random.Random(args.seed + 1).randrange(3, 32000) for _ in range(args.timing_prompt_len)]
    tokens: dict[str, list[list[int]]] = {}
    step_ms: dict[str, float] = {}
    hf = None
    weights = None
    for backend in ("torch", "triton"):
        llm = LLM(args.model, device=device, attention_backend=backend, num_blocks=args.num_blocks)
        assert llm.engine.runner.attention_backend == backend
        if weights is None:
            weights = llm.engine.runner.model.state_dict()
            hf = _hf_model(llm, device)
        else:
            llm.engine.runner.model.load_state_dict(weights)
        tokens[backend] = _engine_greedy(llm, prompts, args.max_tokens)
        step_ms[backend] = _decode_ms_per_token(llm, timing_prompt, args.decode_steps)
        del llm
        torch.cuda.empty_cache()
    tokens["hf"] = [_hf_greedy(hf, p, args.max_tokens, device) for p in prompts]

    rows = []
    parity = []
    for i, p in enumerate(prompts):
        row = {"prompt": i, "prompt_len": len(p)}
        for backend in ("torch", "triton"):
            n = _common_prefix(tokens[backend][i], tokens["hf"][i])
            row[f"{backend}_vs_hf"] = n
            if n < args.max_tokens:
                row[f"{backend}_margin"] = _margin(hf, p + tokens["hf"][i][:n], device)
        row["torch_vs_triton"] = _common_prefix(tokens["torch"][i], tokens["triton"][i])
        parity.append(row)

        def cell(b, row=row):
            n = row[f"{b}_vs_hf"]
            return f"{n}/{args.max_tokens}" + (f" (parts at {n}, HF margin {row[f'{b}_margin']:.3f})"
                                               if n < args.max_tokens else "")

        rows.append([i, len(p), cell("torch"), cell("triton"), f"{row['torch_vs_triton']}/{args.max_tokens}"])
    res["parity"] = parity
    print(f"\n## Greedy parity, {args.model} bf16: leading tokens equal to HF transformers (sdpa), "
          f"{args.max_tokens} generated\n")
    print(_table(["prompt", "len", "engine torch vs HF", "engine triton vs HF", "torch vs triton"], rows))

    speed = [["pdserve engine, attention torch", f"{step_ms['torch']:.2f}"],
             ["pdserve engine, attention triton", f"{step_ms['triton']:.2f}"]]
    res["engine_ms_per_token"] = step_ms
    res["hf_ms_per_token"] = {}
    res["hf_ms_per_token"]["dynamic"] = _hf_ms_per_token(hf, timing_prompt, args.decode_steps, device)
    speed.append(["HF generate, dynamic cache (eager)", f"{res['hf_ms_per_token']['dynamic']:.2f}"])
    if not args.no_hf_compile:
        try:
            ms = _hf_ms_per_token(hf, timing_prompt, args.decode_steps, device, cache_implementation="static")
            res["hf_ms_per_token"]["static_compiled"] = ms
            speed.append(['HF generate, cache_implementation="static" (torch.compile)', f"{ms:.2f}"])
        except Exception as e:  # noqa: BLE001 - a baseline that fails to compile is reported, not fatal
            speed.append(['HF generate, cache_implementation="static" (torch.compile)', f"failed: {e!r}"[:120]])
    print(f"\n## Batch-1 decode, {args.model} bf16, {len(timing_prompt)}-token prompt, "
          f"median of {args.decode_steps} steps\n")
    print(_table(["system", "ms / token"], speed))
    res["overlap"] = overlap(args, device)
    res["ok"] = all(r["ok"] for r in res["kernels"])
    return res


def overlap(args, device: str) -> dict:
    """4. async output processing on the GPU: the same batch through an engine with it on and one with it off."""
    import torch

    from bench.overlap_bench import run, workload
    from pdserve import LLM

    prompts, params = workload(args.overlap_prompts, 64, 5, args.seed)
    engines = {m: LLM(args.model, device=device, num_blocks=args.num_blocks, async_output=m) for m in ("on", "off")}
    for llm in engines.values():
        llm.generate(prompts[:4], params[:4])
    walls: dict[str, list[float]] = {m: [] for m in engines}
    same, tokens = [], 0
    for r in range(4):
        outs = {}
        for m in (("on", "off") if r % 2 == 0 else ("off", "on")):
            torch.cuda.synchronize()
            wall, _, outs[m], tokens = run(engines[m], prompts, params)
            walls[m].append(wall)
        # bf16 near-ties may part where the batches differ (a stop string's extra row with async output): counted
        same.append(sum(a == b for a, b in zip(outs["on"], outs["off"], strict=True)))
    on, off = statistics.median(walls["on"]), statistics.median(walls["off"])
    print(f"\n## Async output processing, {args.model} bf16, {len(prompts)} prompts, {tokens} output tokens, "
          f"median of 4 rounds (requests with identical outputs, per round: {same} of {len(prompts)})\n")
    print(_table(["async_output", "tok/s", "vs off"],
                 [["on", f"{tokens / on:.0f}", f"{off / on:.2f}x"], ["off", f"{tokens / off:.0f}", "1.00x"]]))
    del engines
    torch.cuda.empty_cache()
    return {"on_s": on, "off_s": off, "ratio": off / on, "tokens": tokens, "identical_per_round": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b-dummy")
    ap.add_argument("--num-prompts", type=int, default=6, choices=range(3, 9), metavar="3..8",
                    help="first wave of prompts (2 sharing a prefix with the third are added)")
    ap.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt for parity")
    ap.add_argument("--decode-steps", type=int, default=64, help="timed decode steps at batch 1")
    ap.add_argument("--timing-prompt-len", type=int, default=128)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--no-hf-compile", action="store_true", help="skip the static-cache torch.compile baseline")
    ap.add_argument("--overlap-prompts", type=int, default=64, help="prompts of the async-output comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    res = cuda_check(args) if torch.cuda.is_available() else cpu_interpreted(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    ok = res.get("ok", all(r["ok"] for r in res.get("kernels", res.get("cases", []))))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
