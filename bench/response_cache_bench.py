"""The router's response cache: latency of a hit against the miss that filled it, and tenant isolation.

A local cluster (tiny model) with ``--response-cache-mib`` and API keys for three tenants. For each of
``--num-prompts`` distinct prompts, tenant ``alice`` asks for a greedy answer of ``--max-tokens`` tokens
(``ignore_eos``) twice: the first call is a miss (the baseline: the cluster computes it), the second a hit.
Then tenant ``bob`` asks the very same requests: a hit there would be a cross-tenant hit, and there must be
none; bob's second call hits his own entry. Reported: miss and hit latency (end to end, p50 / p90), the hit
to miss ratio of the p50s, whether hits returned exactly the miss's tokens, and the hit counts by tenant.

    python -m bench.response_cache_bench --json /tmp/response_cache.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.rpc import bearer

KEYS = {"key-alice": "alice", "key-bob": "bob"}


async def ask(stub, key: str, req: pb.GenerateRequest) -> tuple[float, list[int], bool]:
    t0 = time.perf_counter()
    tokens, cached = [], False
    async for resp in stub.Generate(req, metadata=bearer(key), timeout=300):
        tokens.extend(resp.token_ids)
        cached = cached or resp.cached
    return time.perf_counter() - t0, tokens, cached


async def drive(address: str, a) -> dict:
    rng = random.Random(a.seed)
    rows = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        for _ in range(a.num_prompts):
            req = pb.GenerateRequest(token_ids=[rng.randrange(3, 259) for _ in range(a.prompt_len)],
                                     sampling=pb.SamplingParams(max_tokens=a.max_tokens, temperature=0,
                                                                ignore_eos=True))
            miss = await ask(stub, "key-alice", req)
            hit = await ask(stub, "key-alice", req)
            bob_first = await ask(stub, "key-bob", req)
            bob_again = await ask(stub, "key-bob", req)
            rows.append({"miss": miss, "hit": hit, "bob_first": bob_first, "bob_again": bob_again})
    return {"rows": rows}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", default="1,1", help="P,D workers")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    num_prefill, num_decode = (int(x) for x in a.local.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps(KEYS))
        router_args = ["--api-keys", str(keys), "--response-cache-mib", "64"]
        with LocalCluster(num_prefill, num_decode, model=a.model, router_args=router_args) as c:
            rows = asyncio.run(drive(c.router_address, a))["rows"]
    miss = [r["miss"][0] for r in rows]
    hit = [r["hit"][0] for r in rows]
    out = {
        "miss_p50_ms": statistics.median(miss) * 1e3, "miss_p90_ms": pct(miss, 0.9) * 1e3,
        "hit_p50_ms": statistics.median(hit) * 1e3, "hit_p90_ms": pct(hit, 0.9) * 1e3,
        "hit_to_miss_p50": statistics.median(hit) / statistics.median(miss),
        "hits_marked_cached": sum(r["hit"][2] for r in rows), "misses_marked_cached": sum(r["miss"][2] for r in rows),
        "hits_exact": sum(r["hit"][1] == r["miss"][1] and len(r["hit"][1]) == a.max_tokens for r in rows),
        "cross_tenant_hits": sum(r["bob_first"][2] for r in rows),
        "bob_own_hits": sum(r["bob_again"][2] for r in rows), "num_prompts": len(rows),
    }
    print(f"{a.max_tokens}-token greedy answers, {len(rows)} prompts")
    print(f"  miss (computed)   p50 {out['miss_p50_ms']:9.2f} ms   p90 {out['miss_p90_ms']:9.2f} ms")
    print(f"  hit  (cached)     p50 {out['hit_p50_ms']:9.2f} ms   p90 {out['hit_p90_ms']:9.2f} ms")
    print(f"  hit / miss p50 = {out['hit_to_miss_p50']:.4f}x; hits marked cached {out['hits_marked_cached']}/"
          f"{len(rows)}, exact tokens {out['hits_exact']}/{len(rows)}")
    print(f"  cross-tenant hits (bob asking alice's requests): {out['cross_tenant_hits']}/{len(rows)}; "
          f"bob's own repeats hit: {out['bob_own_hits']}/{len(rows)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
