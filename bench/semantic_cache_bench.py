"""The semantic cache: what it saves on paraphrases and what it gets wrong on near misses, in one run.

A local cluster (tiny-chat) with ``--response-cache-mib`` and ``--semantic-cache-threshold``. For each pair
below the first prompt is asked (a miss, computed: the baseline), then the second. Three kinds of pair:
- ``paraphrase``: the same question in other words; a hit is what the cache is for;
- ``different``: a question that embeds alike but asks something else; a hit here is a wrong answer;
- ``unrelated``: a control; it should always miss.
Reported per kind: hits, the similarity each second prompt got, and the latency of hits against the miss
that filled the entry (p50 ratio). The threshold trades the paraphrase hit rate against wrong answers.

    python -m bench.semantic_cache_bench --threshold 0.9
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from pdserve.deploy.local import LocalCluster
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

PAIRS = {
    "paraphrase": [
        ("What is the capital of France?", "Tell me the capital city of France."),
        ("How do I reset my password?", "How can I reset my password?"),
        ("What time does the store open?", "When does the store open?"),
        ("Give me a recipe for pancakes.", "Can you give me a pancake recipe?"),
        ("How many days are in a leap year?", "How many days does a leap year have?"),
        ("Who wrote Hamlet?", "Who is the author of Hamlet?"),
    ],
    "different": [
        ("Convert 10 miles to kilometers", "Convert 10 kilometers to miles"),
        ("Is it safe to take ibuprofen with alcohol?", "Is it safe to take ibuprofen without alcohol?"),
        ("What is the boiling point of water in Celsius?", "What is the boiling point of water in Fahrenheit?"),
        ("How do I reset my email password?", "How do I change my email password?"),
        ("Write a poem about cats", "Write a poem about dogs"),
        ("What is the capital of Italy?", "What is the capital of Spain?"),
    ],
    "unrelated": [
        ("How do I bake sourdough bread?", "What is the tallest mountain on Earth?"),
        ("Explain photosynthesis.", "Recommend a good science fiction novel."),
    ],
}


async def ask(stub, prompt: str, max_tokens: int) -> tuple[float, bool, float]:
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                        ignore_eos=True))
    t0 = time.perf_counter()
    cached, sim = False, 0.0
    async for resp in stub.Generate(req, timeout=300):
        if resp.cached:
            cached, sim = True, resp.cache_similarity
    return time.perf_counter() - t0, cached, sim


async def drive(address: str, max_tokens: int) -> dict:
    out: dict = {}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationStub(ch)
        for kind, pairs in PAIRS.items():
            rows = []
            for first, second in pairs:
                miss = await ask(stub, first, max_tokens)
                again = await ask(stub, second, max_tokens)
                rows.append({"miss_s": miss[0], "first_hit": miss[1], "second_s": again[0], "hit": again[1],
                             "similarity": again[2]})
            out[kind] = rows
    return out


def embed_ms() -> float:
    """Median wall time of one embedding of each prompt above: the CPU a cacheable miss costs the router."""
    from pdserve.router.embedder import SentenceEmbedder

    embedder = SentenceEmbedder(None)
    texts = [t for pairs in PAIRS.values() for pair in pairs for t in pair]
    embedder.embed(texts[0])  # warm
    times = []
    for t in texts:
        t0 = time.perf_counter()
        embedder.embed(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--model", default="tiny-chat")
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    router_args = ["--response-cache-mib", "64", "--semantic-cache-threshold", str(a.threshold)]
    with LocalCluster(1, 1, model=a.model, router_args=router_args) as c:
        res = asyncio.run(drive(c.router_address, a.max_tokens))
    print(f"semantic cache at threshold {a.threshold}, {a.max_tokens}-token greedy answers ({a.model})")
    for kind, rows in res.items():
        hits = [r for r in rows if r["hit"]]
        line = f"  {kind:<10} second prompt hit {len(hits)}/{len(rows)}"
        if hits:
            misses = [r["miss_s"] for r in rows if not r["first_hit"]] or [r["miss_s"] for r in rows]
            ratio = statistics.median(r["second_s"] for r in hits) / statistics.median(misses)
            sims = ", ".join(f"{r['similarity']:.3f}" for r in hits)
            line += f"; hit / miss latency p50 {ratio:.3f}x; similarities of hits: {sims}"
        print(line)
    wrong = sum(r["hit"] for r in res["different"] + res["unrelated"])
    print(f"  one embedding (router.embedder, numpy, this process): p50 {embed_ms():.1f} ms over the bench's prompts")
    first_hits = sum(r["first_hit"] for rows in res.values() for r in rows)
    print(f"  first prompts answered from the cache (an earlier pair's entry): {first_hits}")
    print(f"  wrong answers served (hits on different or unrelated questions): {wrong}")


if __name__ == "__main__":
    main()
