"""The router's response cache: whole answers to deterministic requests, replayed without touching a worker.

What is cached: answers to greedy requests (temperature 0) and to sampled requests with a seed (seeded
sampling draws token i from (seed, i), so the answer does not depend on the batch or the worker). An answer
is stored only when it finished normally (``stop`` or ``length``), never after an error, a cancel or a
client that went away mid-stream.

Key: a BLAKE2b-256 digest of the served model (the base model or adapter that answers, after a route;
``ClientRequest.model``), so one cache and one byte budget serve every model of the router, the tenant scope, the sampling parameters (for greedy ones,
without the knobs greedy ignores: temperature, top_p, top_k, seed) and the prompt's token ids (after chat
templating and tokenization, so two spellings of one prompt share an entry).

Isolation: each tenant has its own scope, so one tenant never gets an answer another tenant's request
produced; tenants named in ``shared_tenants`` (``--cache-shared-tenants``) share one scope among themselves.
With router API keys the tenant is the key's (router.auth); without keys it is whatever the client claims.

Budget: entries live ``ttl_s`` seconds (``--response-cache-ttl-s``) and the whole cache holds at most
``max_bytes`` (``--response-cache-mib``; 0 turns it off), evicting the least recently used entry first; an
entry is its stored messages plus ``ENTRY_OVERHEAD`` bytes. The cache lives in the router process: replicas
do not share it and a restart empties it.

Per request (``GenerateRequest.cache``): ``use`` (default) reads and, on a miss, stores; ``bypass`` neither
reads nor stores; ``refresh`` does not read, computes and stores (replacing the entry). A hit streams the
stored answer (coalesced into messages of about ``CHUNK_TOKENS`` tokens) with ``cached = true`` on the last
message, empty worker names and timings of the hit itself; metrics ``pdserve_router_response_cache_hits_total``
and ``..._misses_total`` count lookups of cacheable requests in ``use`` mode.

With a semantic index (router.semantic_cache, off by default) an exact miss in ``use`` mode is looked up
again by prompt similarity among the entries that differ from it only in their prompt; a hit replays that
entry with ``cache_similarity`` (1.0 for an exact hit) on the last message.
"""

from __future__ import annotations

import array
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace

from prometheus_client import Counter, Gauge

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.request import ClientRequest
from pdserve.router.semantic_cache import SemanticIndex
from pdserve.serving.convert import set_stop_reason, stop_reason_of

HITS = Counter("pdserve_router_response_cache_hits_total", "Cacheable requests answered from the response cache")
MISSES = Counter("pdserve_router_response_cache_misses_total", "Cacheable requests the response cache did not hold")
STORED_BYTES = Gauge("pdserve_router_response_cache_bytes", "Bytes held by the response cache")

CHUNK_TOKENS = 64
ENTRY_OVERHEAD = 256
MODES = {pb.CACHE_USE: "use", pb.CACHE_BYPASS: "bypass", pb.CACHE_REFRESH: "refresh"}
SHARED_SCOPE = b"\x00shared"  # cannot collide with a tenant's scope (b"t:" + name)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_bytes: int = 0  # 0: no cache
    ttl_s: float = 300.0
    shared_tenants: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"response_cache_mib: must be >= 0, got {self.max_bytes}")
        if not self.ttl_s > 0 or self.ttl_s == float("inf"):
            raise ValueError(f"response_cache_ttl_s: must be > 0 and finite, got {self.ttl_s}")


def cache_mode(value: int) -> str:
    """``GenerateRequest.cache`` -> "use" | "bypass" | "refresh"; INVALID_ARGUMENT for an unknown value."""
    mode = MODES.get(value)
    if mode is None:
        raise InvalidRequestError(f"cache: unknown mode {value}; use CACHE_USE, CACHE_BYPASS or CACHE_REFRESH")
    return mode


def is_deterministic(params: SamplingParams) -> bool:
    return params.greedy or params.seed is not None


@dataclass(slots=True)
class _Entry:
    model: str  # what served it: dropped when that adapter is loaded anew or unloaded (drop_model)
    chunks: list[bytes]  # serialized GenerateResponse messages; the last one carries finish_reason and usage
    num_bytes: int
    expires: float


class _Recorder:
    """Folds a live stream into the messages a hit replays (about CHUNK_TOKENS tokens each)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.current: pb.GenerateResponse | None = None
        self.texts: list[str] = []
        self.finish_reason = ""

    def add(self, resp: pb.GenerateResponse) -> None:
        cur = self.current
        if cur is None:
            cur = self.current = pb.GenerateResponse()
        cur.token_ids.extend(resp.token_ids)
        cur.prompt_logprobs.extend(resp.prompt_logprobs)
        cur.logprobs.extend(resp.logprobs)
        self.texts.append(resp.text)
        if resp.finish_reason:
            self.finish_reason = resp.finish_reason
            cur.finish_reason = resp.finish_reason
            set_stop_reason(cur, stop_reason_of(resp))
            cur.usage.CopyFrom(resp.usage)
        if resp.finish_reason or len(cur.token_ids) >= CHUNK_TOKENS:
            cur.text = "".join(self.texts)
            self.chunks.append(cur.SerializeToString())
            self.current, self.texts = None, []

    @property
    def complete(self) -> bool:
        return self.finish_reason in ("stop", "length") and self.current is None


class ResponseCache:
    def __init__(self, cfg: CacheConfig, model: str = "", clock: Callable[[], float] = time.monotonic,
                 semantic: SemanticIndex | None = None):
        self.cfg = cfg
        self.semantic = semantic
        self.model = model
        self.clock = clock
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0

    # ---- keys and entries -------------------------------------------------------------------------
    def key(self, req: ClientRequest) -> bytes | None:
        """The request's cache key, or None when its answer is not deterministic."""
        keys = self.keys(req)
        return None if keys is None else keys[1]

    def keys(self, req: ClientRequest) -> tuple[bytes, bytes] | None:
        """(bucket, key): the bucket digests everything but the prompt (model, tenant scope, sampling), the key
        adds the prompt's token ids. None when the answer is not deterministic."""
        params = req.sampling
        if not is_deterministic(params):
            return None
        if params.greedy:
            params = replace(params, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None)  # unread
        scope = SHARED_SCOPE if req.tenant in self.cfg.shared_tenants else b"t:" + req.tenant.encode()
        h = hashlib.blake2b(digest_size=32, person=b"pdserve-respcach")
        for part in ((req.model or self.model).encode(), scope, repr(params).encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        bucket = h.digest()
        h.update(array.array("q", req.token_ids).tobytes())
        return bucket, h.digest()

    def get(self, key: bytes) -> list[bytes] | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry.chunks

    def put(self, key: bytes, chunks: list[bytes], model: str = "") -> bool:
        """Store an answer (replacing one under the same key); False when it alone exceeds the budget."""
        size = sum(len(c) for c in chunks) + len(key) + ENTRY_OVERHEAD
        if size > self.cfg.max_bytes:
            return False
        if key in self.entries:
            self._drop(key)
        while self.num_bytes + size > self.cfg.max_bytes:
            self._drop(next(iter(self.entries)))
        self.entries[key] = _Entry(model, chunks, size, self.clock() + self.cfg.ttl_s)
        self.num_bytes += size
        STORED_BYTES.set(self.num_bytes)
        return True

    def drop_model(self, model: str) -> int:
        """Forget every answer ``model`` gave (an adapter loaded anew under its name, or unloaded); -> how many."""
        keys = [k for k, e in self.entries.items() if e.model == model]
        for k in keys:
            self._drop(k)
        return len(keys)

    def _drop(self, key: bytes) -> None:
        entry = self.entries.pop(key)
        if self.semantic is not None:
            self.semantic.forget(key)
        self.num_bytes -= entry.num_bytes
        STORED_BYTES.set(self.num_bytes)

    # ---- the servicer's hook -----------------------------------------------------------------------
    async def through(self, req: ClientRequest, mode: str, responses: AsyncIterator[pb.GenerateResponse]
                      ) -> AsyncIterator[pb.GenerateResponse]:
        """``responses`` (the live answer, not started yet) through the cache: replayed on a hit, recorded on a
        miss."""
        keys = None if mode == "bypass" else self.keys(req)
        if keys is None:
            async for resp in responses:
                yield resp
            return
        bucket, key = keys
        vec = None
        if mode == "use":
            t0 = self.clock()
            chunks, similarity = self.get(key), 1.0
            if chunks is not None:
                self.num_hits += 1
                HITS.inc()
            else:
                self.num_misses += 1
                MISSES.inc()
                if self.semantic is not None:
                    vec = await self.semantic.embed(req)
                    found = self.semantic.lookup(bucket, vec, alive=lambda k: k in self.entries)
                    if found is not None:
                        chunks, similarity = self.get(found[0]), found[1]
            if chunks is not None:
                for resp in self._replay(chunks, req, t0, similarity):
                    yield resp
                return
        recorder = _Recorder()
        async for resp in responses:
            recorder.add(resp)
            yield resp
        if recorder.complete and self.put(key, recorder.chunks, req.model) and self.semantic is not None:
            self.semantic.add(bucket, key, vec if vec is not None else await self.semantic.embed(req))

    def _replay(self, chunks: list[bytes], req: ClientRequest, t0: float, similarity: float
                ) -> Iterator[pb.GenerateResponse]:
        for i, data in enumerate(chunks):
            resp = pb.GenerateResponse.FromString(data)
            resp.request_id = req.request_id
            if i == len(chunks) - 1:
                resp.cached = True
                resp.cache_similarity = similarity
                resp.model = req.model or self.model  # what served it, as on the live path (router.responses)
                resp.usage.prompt_tokens = len(req.token_ids)  # a semantic hit answers a prompt of its own
                elapsed = max(0.0, self.clock() - t0)
                resp.timings.first_token_s = resp.timings.total_s = elapsed
            yield resp
