"""Serving throughput on one workload, four systems, one run: HF generate, HF continuous batching
(``generate_batch``), pdserve colocated (decode workers prefill locally) and pdserve disaggregated
(router + prefill + decode processes, KV over the transfer layer). Ratios against both HF baselines.

    python -m bench.serving_bench --model tiny --num-requests 64 --input-len-range 32,256 --output-len 32
    # GPU (matches ../shared/baselines):
    python -m bench.serving_bench --model llama-1b-dummy --device cuda --num-requests 256 \
        --input-len-range 64,1024 --output-len 128 --hf-batch 32 --worker-arg=--kv-cache-mib=16384 \
        --worker-arg=--max-num-seqs=256 --worker-arg=--max-num-batched-tokens=8192
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time

import torch

from pdserve.bench import workloads
from pdserve.bench.client import run_closed_loop


def load_hf(model: str, device: str):
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.model_runner import _load_model
    from pdserve.engine.models import resolve_model

    path, dummy = resolve_model(model)
    cfg = EngineConfig(model=model, device=device, model_impl="hf")  # transformers' own modules, not engine.native
    _, m, _ = _load_model(path, dummy, cfg, cfg.torch_dtype())
    m.set_attn_implementation("sdpa")
    return m


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate(m, prompts, out_len: int, batch: int, device: str) -> float:
    from transformers import GenerationConfig

    # eos set + min_new_tokens: exact lengths on HF's fast path (eos_token_id=None ran ~6x slower on CPU here)
    eos = m.generation_config.eos_token_id if m.generation_config.eos_token_id is not None else 2
    gc_ = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0,
                           eos_token_id=eos)
    warm = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        m.generate(torch.tensor([prompts[0][:8]], device=device), generation_config=warm)
    total = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            w = max(map(len, chunk))
            ids = torch.tensor([[0] * (w - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = m.generate(ids, attention_mask=mask, generation_config=gc_)
            total += (out.shape[1] - w) * len(chunk)
    sync(device)
    return total / (time.perf_counter() - t0)


def hf_continuous(m, prompts, out_len: int, device: str) -> float:
    from transformers import GenerationConfig

    gc_ = GenerationConfig(max_new_tokens=out_len, do_sample=False, pad_token_id=0, eos_token_id=None)
    m.set_attn_implementation("paged|sdpa")
    m.generate_batch(inputs=prompts[:4], generation_config=gc_)
    t0 = time.perf_counter()
    res = m.generate_batch(inputs=prompts, generation_config=gc_)
    sync(device)
    dt = time.perf_counter() - t0
    m.set_attn_implementation("sdpa")
    return sum(len(v.generated_tokens) for v in res.values()) / dt


def pdserve(model, device, prefill: int, reqs, concurrency: int, worker_args: list[str]) -> tuple[float, dict]:
    from pdserve.bench.metrics import summarize
    from pdserve.deploy.local import LocalCluster

    router_args = ["--local-prefill-tokens", "0"]
    with LocalCluster(prefill, 1, model=model, device=device, extra_worker_args=worker_args,
                      router_args=router_args, ready_timeout_s=600) as c:
        warm = [workloads.BenchRequest(r.token_ids[:32], 4) for r in reqs[:4]]
        asyncio.run(run_closed_loop(c.router_address, warm, 4, 600, progress=False))
        t0 = time.perf_counter()
        records = asyncio.run(run_closed_loop(c.router_address, reqs, concurrency, 3600, 600))
        wall = time.perf_counter() - t0
    s = summarize(records)
    bad = s["num_requests"] - s["num_ok"]
    if bad:
        raise RuntimeError(f"{bad} requests failed: {s['errors']}")
    return sum(r.output_tokens for r in records) / wall, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len-range", default="32,256")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--vocab-hi", type=int, default=259)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=0, help="client concurrency (0: all requests at once)")
    ap.add_argument("--worker-arg", action="append", default=[])
    ap.add_argument("--skip", default="", help="comma list of systems to skip: hf,hf_cb,colocated,disagg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    lo, hi = (int(x) for x in a.input_len_range.split(","))
    reqs = workloads.uniform(a.num_requests, (lo, hi), a.output_len, a.seed, (3, a.vocab_hi))
    prompts = [r.token_ids for r in reqs]
    skip = set(a.skip.split(",")) if a.skip else set()
    res: dict[str, float] = {}
    if not {"hf", "hf_cb"} <= skip:
        m = load_hf(a.model, a.device)
        if "hf" not in skip:
            res[f"HF generate (static batches of {a.hf_batch})"] = hf_generate(
                m, prompts, a.output_len, a.hf_batch, a.device)
        if "hf_cb" not in skip:
            try:
                res["HF continuous batching (generate_batch)"] = hf_continuous(m, prompts, a.output_len, a.device)
            except Exception as e:  # noqa: BLE001 - report, keep going
                print(f"HF generate_batch failed: {e!r}")
        del m
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    conc = a.concurrency or a.num_requests
    details = {}
    if "colocated" not in skip:
        res["pdserve colocated (1 decode worker)"], details["colocated"] = pdserve(
            a.model, a.device, 0, reqs, conc, a.worker_arg)
    if "disagg" not in skip:
        res["pdserve disaggregated (1 prefill + 1 decode)"], details["disaggregated"] = pdserve(
            a.model, a.device, 1, reqs, conc, a.worker_arg)
    base = next(iter(res.values()))
    cb = res.get("HF continuous batching (generate_batch)")
    print(f"{a.num_requests} requests, prompt U[{lo},{hi}], {a.output_len} output tokens, model {a.model} "
          f"on {a.device}")
    print(f"{'system':48} {'out tok/s':>10} {'vs first':>9} {'vs HF CB':>9}")
    for k, v in res.items():
        print(f"{k:48} {v:10.1f} {v / base:9.2f} {(v / cb if cb else float('nan')):9.2f}")
    for k, s in details.items():
        print(f"{k}: TTFT p50 {s['ttft_s']['p50'] * 1e3:.1f} ms, p99 {s['ttft_s']['p99'] * 1e3:.1f} ms; "
              f"TPOT p50 {s['tpot_s']['p50'] * 1e3:.2f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": res, "details": details, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
