"""Pair choice: which (prefill, decode) workers serve a request, or decode-local prefill.

Policies (``--policy``):
- ``cache_aware`` (default): score every (prefill, decode) pair by predicted TTFT (router.costs) using
  the exact prefix index, and pick the minimum.
- ``round_robin``: cycle through prefill and decode workers.
- ``least_loaded``: fewest queued prefill tokens; decode with the fewest running sequences / KV usage.
- ``power_of_two``: sample two of each, keep the less loaded.
- ``session_affinity``: hash of session_id (or tenant) picks the workers, the classic "IP hash";
  hashed over the available workers; least loaded when the request has no session key or tenant.

Conditional disaggregation (every policy): when the prompt part not cached on the decode worker is at
most ``local_prefill_tokens`` tokens, or no prefill worker is available, the decode worker prefills
locally. ``saturation_s`` also sends work local when even the best prefill's predicted queue exceeds it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass

from router.costs import CostModel, topology
from router.membership import Worker
from router.prefix_index import PrefixIndex

POLICIES = ("cache_aware", "round_robin", "least_loaded", "power_of_two", "session_affinity")


@dataclass(slots=True)
class RouteRequest:
    prompt_len: int
    block_hashes: list[int]
    session_key: str = ""


@dataclass(slots=True)
class Decision:
    prefill: Worker | None
    decode: Worker
    predicted_ttft_s: float
    cached_blocks: int  # on the chosen prefill worker (or on the decode worker when local)
    reason: str


def _prefill_load(w: Worker) -> float:
    return w.in_flight * 256 + w.load.num_queued_tokens


def _decode_load(w: Worker) -> float:
    total = max(1, w.load.num_total_blocks)
    return w.in_flight + w.load.num_running + w.load.num_waiting + (1 - w.load.num_free_blocks / total)


def _stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def kv_bytes_per_token(load) -> float:
    try:
        fp = json.loads(load.fingerprint)
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(fp["dtype"], 2)
        return 2 * fp["num_kv_heads"] * fp["head_dim"] * itemsize * fp["num_layers"]
    except (ValueError, KeyError, TypeError):
        return 0.0


class PairPolicy:
    def __init__(
        self,
        name: str = "cache_aware",
        index: PrefixIndex | None = None,
        costs: CostModel | None = None,
        block_size: int = 16,
        local_prefill_tokens: int = 0,
        saturation_s: float = 0.0,
        seed: int = 0,
    ):
        if name not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES}, got {name!r}")
        if local_prefill_tokens < 0:
            raise ValueError("local_prefill_tokens: must be >= 0")
        self.name = name
        self.index = index or PrefixIndex()
        self.costs = costs or CostModel()
        self.block_size = block_size
        self.local_prefill_tokens = local_prefill_tokens
        self.saturation_s = saturation_s
        self._counter = itertools.count()
        self._rng = random.Random(seed)

    def choose(self, req: RouteRequest, prefills: list[Worker], decodes: list[Worker]) -> Decision:
        """Raises LookupError when no decode worker is available."""
        if not decodes:
            raise LookupError("no decode worker is available")
        prefills = sorted(prefills, key=lambda w: w.address)
        decodes = sorted(decodes, key=lambda w: w.address)
        if not self.costs.kv_bytes_per_token:
            self.costs.kv_bytes_per_token = kv_bytes_per_token(decodes[0].load)
        overlap = self.index.overlap(req.block_hashes, [w.address for w in prefills + decodes])
        pick = getattr(self, f"_{self.name}")
        prefill, decode = pick(req, prefills, decodes, overlap)
        # conditional disaggregation
        local_uncached = req.prompt_len - overlap.get(decode.address, 0) * self.block_size
        reason = self.name
        if prefill is None:
            reason = "no prefill worker"
        elif local_uncached <= self.local_prefill_tokens:
            prefill, reason = None, "short uncached prompt"
        elif self.saturation_s and self._queue_s(prefill) > self.saturation_s:
            prefill, reason = None, "prefill pool saturated"
        if prefill is None:
            ttft = self.costs.prefill_s(decode.address, decode.load.num_queued_tokens, local_uncached)
            return Decision(None, decode, ttft + self.costs.decode_s(decode.load), overlap.get(decode.address, 0), reason)
        return Decision(prefill, decode, self.predict(req, prefill, decode, overlap), overlap.get(prefill.address, 0), reason)

    # ---- scoring ----------------------------------------------------------------------------------
    def _queue_s(self, p: Worker) -> float:
        return self.costs.prefill_s(p.address, p.load.num_queued_tokens + p.in_flight * 256, 0)

    def predict(self, req: RouteRequest, p: Worker, d: Worker, overlap: dict[str, int]) -> float:
        uncached = max(1, req.prompt_len - overlap.get(p.address, 0) * self.block_size)
        queued = p.load.num_queued_tokens + p.in_flight * 256
        return (
            self.costs.prefill_s(p.address, queued, uncached)
            + self.costs.transfer_s(topology(p.load, d.load), req.prompt_len)
            + self.costs.decode_s(d.load)
            + d.in_flight * 1e-4
        )

    # ---- policies ---------------------------------------------------------------------------------
    def _cache_aware(self, req, prefills, decodes, overlap):
        if not prefills:
            return None, min(decodes, key=_decode_load)
        best = min(
            ((p, d) for p in prefills for d in decodes),
            key=lambda pd: (self.predict(req, pd[0], pd[1], overlap), pd[0].address, pd[1].address),
        )
        return best

    def _round_robin(self, req, prefills, decodes, overlap):
        n = next(self._counter)
        return (prefills[n % len(prefills)] if prefills else None), decodes[n % len(decodes)]

    def _least_loaded(self, req, prefills, decodes, overlap):
        return (min(prefills, key=_prefill_load) if prefills else None), min(decodes, key=_decode_load)

    def _power_of_two(self, req, prefills, decodes, overlap):
        def two(ws, key):
            return min(self._rng.sample(ws, min(2, len(ws))), key=key) if ws else None

        return two(prefills, _prefill_load), two(decodes, _decode_load)

    def _session_affinity(self, req, prefills, decodes, overlap):
        if not req.session_key:
            return self._least_loaded(req, prefills, decodes, overlap)
        h = _stable_hash(req.session_key)
        return (prefills[h % len(prefills)] if prefills else None), decodes[(h >> 17) % len(decodes)]
