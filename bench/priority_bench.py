"""Priorities that act: high-priority TTFT while low-priority streams saturate the decode worker.

A local cluster (tiny model, one decode worker with ``--max-num-seqs`` small) gets ``--num-low`` closed-loop
clients of low-priority (0) streams, enough to fill the decode worker's batch and its waiting queue. Every client
retries a refusal (RESOURCE_EXHAUSTED, the router's admission bound) after ``--retry-s`` (100 ms; the router's
hint is 500 ms), and its TTFT counts from its first attempt, as the client sees it. Once the low streams run, two open-loop series of short requests
arrive at fixed gaps, interleaved: ``high`` (priority 5) and, as the baseline in the same run, ``same-class``
(the same requests at priority 0). Reported: TTFT p50 / p90 of each series and of the low streams that started
during the measurement, the ratios to the low streams' p50, the decode worker's preemptions, and whether every
request (every preempted one included) returned exactly the tokens of an unloaded run (the offline engine on
the same model, greedy).

    python -m bench.priority_bench --json /tmp/priority.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import grpc

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

VOCAB = (3, 259)


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


async def one(stub, token_ids: list[int], max_tokens: int, priority: int, timeout: float, retry_s: float = 0.0
              ) -> dict:
    """One request; with ``retry_s``, a refusal (RESOURCE_EXHAUSTED) is retried after that long and the TTFT
    counts from the first attempt, as the client sees it."""
    req = pb.GenerateRequest(token_ids=token_ids, priority=priority,
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    refusals = 0
    while True:
        ttft, tokens, timings = None, [], None
        try:
            async for resp in stub.Generate(req, timeout=timeout):
                if ttft is None and resp.token_ids:
                    ttft = time.perf_counter() - t0
                tokens.extend(resp.token_ids)
                if resp.finish_reason:
                    timings = resp.timings
            return {"prompt": token_ids, "tokens": tokens, "ttft": ttft, "t0": t0, "max_tokens": max_tokens,
                    "refusals": refusals, "queue_s": timings.queue_s, "prefill_s": timings.prefill_s,
                    "transfer_s": timings.transfer_s}
        except grpc.aio.AioRpcError as e:
            if not retry_s or e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            refusals += 1
            await asyncio.sleep(retry_s)


async def drive(address: str, a) -> dict:
    rng = random.Random(a.seed)
    done: dict[str, list[dict]] = {"low": [], "high": [], "same-class": []}
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)

        async def low_client(i: int) -> None:
            crng = random.Random(a.seed * 1000 + i)
            while not stop.is_set():
                done["low"].append(await one(stub, prompt(crng, a.low_prompt_len), a.low_tokens, 0, 300, a.retry_s))

        lows = [asyncio.ensure_future(low_client(i)) for i in range(a.num_low)]
        await asyncio.sleep(a.warmup_s)
        t_measure = time.perf_counter()
        probes = []
        for _ in range(a.num_high):
            p = prompt(rng, a.high_prompt_len)
            for series, prio in (("high", 5), ("same-class", 0)):
                task = asyncio.ensure_future(one(stub, p, a.high_tokens, prio, 300, a.retry_s))
                task.add_done_callback(lambda t, s=series: done[s].append(t.result()) if not t.exception() else None)
                probes.append(task)
                await asyncio.sleep(a.gap_s)
        await asyncio.gather(*probes)
        stop.set()
        await asyncio.gather(*lows)
        workers = (await pb_grpc.AdminStub(ch).ListWorkers(pb.ListWorkersRequest(), timeout=10)).workers
    preemptions = sum(w.load.num_preemptions for w in workers if w.role == "decode")
    refused = {name: sum(r["refusals"] for r in rows) for name, rows in done.items()}
    return {"done": done, "t_measure": t_measure, "refused": refused, "preemptions": preemptions}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def reference_tokens(model: str, runs: list[dict]) -> list[list[int]]:
    from pdserve import LLM, SamplingParams

    llm = LLM(model)
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True) for r in runs]
    return [o.token_ids for o in llm.generate([r["prompt"] for r in runs], params)]


def divergences(model: str, runs: list[dict], refs: list[list[int]]) -> list[str]:
    """For each request whose tokens differ from the reference: where, both tokens, and HF's two best logits
    there (a near-tie, a few 1e-6 apart, is fp32 summation order; a wide gap would be a real error)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pdserve import LLM

    lines = []
    hf = None
    for r, ref in zip(runs, refs, strict=True):
        got = r["tokens"]
        if got == ref:
            continue
        i = next((j for j, (x, y) in enumerate(zip(got, ref, strict=False)) if x != y),
                 min(len(got), len(ref)))
        if i >= min(len(got), len(ref)):
            lines.append(f"  {len(got)} tokens, want {len(ref)}: cut short")
            continue
        if hf is None:
            hf = AutoModelForCausalLM.from_pretrained(LLM(model).engine.runner.model_path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf(torch.tensor([r["prompt"] + ref[:i]])).logits[0, -1]
        gap = abs(logits[got[i]].item() - logits[ref[i]].item())
        best = int(logits.argmax())
        lines.append(f"  token {i}: cluster {got[i]}, offline {ref[i]}; HF picks {best}, their logits "
                     f"{gap:.1e} apart")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", default="1,1", help="P,D workers")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--num-low", type=int, default=24, help="closed-loop low-priority clients")
    ap.add_argument("--low-prompt-len", type=int, default=48)
    ap.add_argument("--low-tokens", type=int, default=96)
    ap.add_argument("--num-high", type=int, default=16, help="requests per probe series")
    ap.add_argument("--high-prompt-len", type=int, default=24)
    ap.add_argument("--high-tokens", type=int, default=8)
    ap.add_argument("--gap-s", type=float, default=0.25, help="between probe arrivals")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--retry-s", type=float, default=0.1, help="a refused request is retried after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    num_prefill, num_decode = (int(x) for x in a.local.split(","))
    worker_args = ["--max-num-seqs", str(a.max_num_seqs)]
    with LocalCluster(num_prefill, num_decode, model=a.model, extra_worker_args=worker_args) as c:
        res = asyncio.run(drive(c.router_address, a))
    done = res["done"]
    lows = [r for r in done["low"] if r["t0"] >= res["t_measure"]]
    every = done["low"] + done["high"] + done["same-class"]
    ref = reference_tokens(a.model, every)
    exact = sum(r["tokens"] == t for r, t in zip(every, ref, strict=True))
    low_p50 = statistics.median(r["ttft"] for r in lows)
    out = {"preemptions": res["preemptions"], "refusals": res["refused"], "exact": exact, "total": len(every)}
    print(f"{'series':<11} {'n':>4} {'TTFT p50 ms':>12} {'p90 ms':>9} {'p50 / low p50':>14}")
    for name, rows in (("low", lows), ("same-class", done["same-class"]), ("high", done["high"])):
        ttfts = [r["ttft"] for r in rows]
        p50 = statistics.median(ttfts)
        out[name] = {"n": len(rows), "ttft_p50_ms": p50 * 1e3, "ttft_p90_ms": pct(ttfts, 0.9) * 1e3,
                     "ratio_to_low_p50": p50 / low_p50}
        parts = {k: statistics.median(r[k] for r in rows) * 1e3 for k in ("queue_s", "prefill_s", "transfer_s")}
        out[name]["router_timings_p50_ms"] = parts
        print(f"{name:<11} {len(rows):>4} {p50 * 1e3:12.1f} {pct(ttfts, 0.9) * 1e3:9.1f} {p50 / low_p50:14.3f}"
              f"   (last attempt p50: queue {parts['queue_s']:.1f}, prefill {parts['prefill_s']:.1f}, "
              f"transfer {parts['transfer_s']:.1f} ms)")
    print(f"decode preemptions {res['preemptions']}; exact tokens {exact}/{len(every)} requests "
          f"(low {len(done['low'])}, of them {len(lows)} started in the window); admission refusals (retried) "
          f"{res['refused']}")
    for line in divergences(a.model, every, ref):
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
