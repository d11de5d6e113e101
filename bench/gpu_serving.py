"""The serving figures of "Engine speed II", one run: the full gRPC disaggregated path against HF baselines.

    python -m pdserve.bench.gpu_serving --json out.json                       # H200 defaults (below)
    python -m pdserve.bench.gpu_serving --model tiny --device cpu --num-prompts 16 --input-len-range 16,64 \
        --output-len 8 --long-prompt 256 --hf-batch 8 --transfer tcp            # the same code path on CPU

In order, each in the same process run:
1. pdserve, disaggregated: router + 1 prefill + 1 decode worker processes on one device (``LocalCluster``),
   KV over ``--transfer`` (ucx: cuda_ipc between the two processes on one GPU). Reported: cluster start-up
   (spawn to every process ready: weights, warm-up, CUDA-graph capture; the workers start concurrently),
   output tok/s for ``--num-prompts`` requests all submitted at once, and for one ``--long-prompt``-token
   prompt the TTFT split the router reports (prefill compute, the transfer tail after compute, the rest).
2. HF transformers on the same weights, in this process: ``generate`` with a static cache in left-padded
   batches of ``--hf-batch``, and continuous batching (``generate_batch``, paged sdpa).
Ratios: pdserve output tok/s over each HF baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

DEFAULT_WORKER_ARGS = ["--kv-cache-mib", "16384", "--max-num-seqs", "256", "--max-num-batched-tokens", "8192"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


async def _long_prompt_ttft(address: str, prompts: list[list[int]]) -> dict:
    import grpc

    from pdserve.protos import pdserve_pb2 as pb
    from pdserve.protos import pdserve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.GenerationStub(ch)
        out = {}
        for i, prompt in enumerate(prompts):  # distinct prompts (no prefix hits); the first one warms up
            req = pb.GenerateRequest(request_id=f"long-{i}-{time.monotonic_ns()}", token_ids=prompt,
                                     sampling=pb.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            resp = await stub.Complete(req, timeout=300)
            t = resp.timings
            out[i] = {"first_token_s": t.first_token_s, "prefill_s": t.prefill_s, "transfer_s": t.transfer_s,
                      "queue_s": t.queue_s, "prefill_worker": resp.prefill_worker}
        runs = sorted((out[i] for i in range(1, len(prompts))), key=lambda r: r["first_token_s"])
        best = runs[len(runs) // 2]
        best["transfer_share"] = best["transfer_s"] / best["first_token_s"] if best["first_token_s"] else 0.0
        return best


def run_pdserve(args, prompts: list[list[int]], long_prompt: list[list[int]]) -> dict:
    from pdserve.bench.client import run_closed_loop
    from pdserve.bench.metrics import summarize
    from pdserve.bench.workloads import BenchRequest
    from pdserve.deploy.local import LocalCluster

    worker_args = list(args.worker_arg) if args.worker_arg else (DEFAULT_WORKER_ARGS if args.device == "cuda" else [])
    reqs = [BenchRequest(p, args.output_len) for p in prompts]
    t0 = time.perf_counter()
    cluster = LocalCluster(1, 1, model=args.model, device=args.device, transfer=args.transfer,
                           extra_worker_args=worker_args, router_args=["--local-prefill-tokens", "0"],
                           ready_timeout_s=args.ready_timeout)
    with cluster:
        startup_s = time.perf_counter() - t0
        print(f"pdserve cluster ready in {startup_s:.1f} s", flush=True)
        warm = [BenchRequest(p[:64], 4) for p in prompts[:8]]
        asyncio.run(run_closed_loop(cluster.router_address, warm, 8, 600, progress=False))
        long = asyncio.run(_long_prompt_ttft(cluster.router_address, long_prompt))
        print(f"long prompt ({len(long_prompt[0])} tokens): {json.dumps(long)}", flush=True)
        t0 = time.perf_counter()
        records = asyncio.run(run_closed_loop(cluster.router_address, reqs, len(reqs), 3600, progress=False))
        wall = time.perf_counter() - t0
    s = summarize(records)
    if s["num_ok"] != s["num_requests"]:
        raise RuntimeError(f"{s['num_requests'] - s['num_ok']} requests failed: {s.get('errors')}")
    out_tokens = sum(r.output_tokens for r in records)
    return {"startup_s": startup_s, "output_tok_s": out_tokens / wall, "wall_s": wall, "output_tokens": out_tokens,
            "ttft_p50_s": s.get("ttft", {}).get("p50"), "long_prompt": long, "worker_args": worker_args,
            "transfer": args.transfer}


def _hf_model(args):
    """HF's own modules and attention with the weights the workers use (dummy presets: the same seed)."""
    import torch

    from pdserve import LLM

    llm = LLM(args.model, device=args.device, num_blocks=64, cuda_graphs=False)
    state = llm.engine.runner.model.state_dict()
    path = llm.engine.runner.model_path
    dtype = llm.engine.runner.dtype
    del llm
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                             attn_implementation="sdpa")
    model.load_state_dict(state)
    del state
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return model.to(args.device).eval()


def hf_static(model, prompts: list[list[int]], out_len: int, batch: int, device: str) -> float:
    import torch
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0,
                           eos_token_id=2, cache_implementation="static")

    def run(chunk):
        w = max(map(len, chunk))
        ids = torch.tensor([[0] * (w - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, generation_config=cfg)
        return (out.shape[1] - w) * len(chunk)

    run(prompts[:batch])  # warm-up (static cache allocation, any compile)
    _sync(device)
    total = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        total += run(prompts[i : i + batch])
    _sync(device)
    return total / (time.perf_counter() - t0)


def hf_continuous(model, prompts: list[list[int]], out_len: int, device: str) -> float:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=out_len, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.set_attn_implementation("paged|sdpa")
    model.generate_batch(inputs=prompts[:4], generation_config=cfg)
    _sync(device)
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=cfg)
    _sync(device)
    dt = time.perf_counter() - t0
    model.set_attn_implementation("sdpa")
    tokens = sum(len(v.generated_tokens) for v in res.values())
    if tokens == 0:
        raise RuntimeError("generate_batch produced no tokens")
    return tokens / dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.bench.gpu_serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b-dummy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--transfer", default="ucx", help="KV transfer backend between the two workers")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len-range", default="64,1024")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=4096, help="tokens of the TTFT-split prompt")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=0, help="token ids drawn below this (0: the model's vocab)")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra worker flag (repeat)")
    ap.add_argument("--skip", default="", help="comma list of: pdserve,hf_static,hf_cb")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    lo, hi = (int(x) for x in args.input_len_range.split(","))
    if not args.vocab:
        from pdserve.engine.models import resolve_tokenizer

        args.vocab = len(__import__("pdserve.engine.tokenizer", fromlist=["x"]).load_light_tokenizer(
            resolve_tokenizer(args.model)))
    prompts = make_prompts(args.num_prompts, lo, hi, args.vocab, args.seed)
    long_prompt = make_prompts(4, args.long_prompt, args.long_prompt, args.vocab, args.seed + 1)
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"model": args.model, "device": args.device, "num_prompts": args.num_prompts,
                 "input_len_range": [lo, hi], "output_len": args.output_len}

    def section(name, fn):
        if name in skip:
            return
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed system is reported, the others still run
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(res[name])[:600]}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)

    section("pdserve", lambda: run_pdserve(args, prompts, long_prompt))
    model = None
    if not {"hf_static", "hf_cb"} <= skip:
        model = _hf_model(args)
    section("hf_static", lambda: {"output_tok_s": hf_static(model, prompts, args.output_len, args.hf_batch,
                                                            args.device), "batch": args.hf_batch})
    section("hf_cb", lambda: {"output_tok_s": hf_continuous(model, prompts, args.output_len, args.device)})

    pd = res.get("pdserve", {}).get("output_tok_s")
    print("\n| system | output tok/s | pdserve / this |\n|---|---|---|")
    for name, label in (("pdserve", "pdserve disaggregated (gRPC, 3 processes)"),
                        ("hf_static", f"HF generate, static cache, batch {args.hf_batch}"),
                        ("hf_cb", "HF continuous batching (generate_batch)")):
        v = res.get(name, {}).get("output_tok_s")
        ratio = f"{pd / v:.2f}x" if pd and v else "-"
        print(f"| {label} | {v:,.0f} | {ratio} |" if v else f"| {label} | {res.get(name)} | - |")
    if pd:
        p = res["pdserve"]
        lp = p["long_prompt"]
        print(f"\nstart-up (spawn to all ready) {p['startup_s']:.1f} s; {args.long_prompt}-token prompt: TTFT "
              f"{lp['first_token_s'] * 1e3:.1f} ms = prefill {lp['prefill_s'] * 1e3:.1f} ms + transfer tail "
              f"{lp['transfer_s'] * 1e3:.1f} ms ({lp['transfer_share']:.1%}) + rest")
    return 0 if pd else 1


if __name__ == "__main__":
    sys.exit(main())
