"""Pair choice: which (prefill, decode) workers serve a request, or decode-local prefill.

Policies (``--policy``):
- ``cache_aware`` (default): score every (prefill, decode) pair by predicted TTFT (router.costs) using
  the exact prefix index, and pick the minimum. The prefill queue counts the uncached tokens of the requests
  this router has in flight on that worker (not a flat guess per request, which drowned the prefix term and
  scattered conversations). Conditional disaggregation considers every decode worker (the one holding the
  conversation, answer included, usually has the least left to compute), not only the pair's.
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
import random
from collections import deque
from dataclasses import dataclass

from pdserve.router.costs import CostModel, topology
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Worker
from pdserve.router.prefix_index import PrefixIndex

POLICIES = ("cache_aware", "round_robin", "least_loaded", "power_of_two", "session_affinity")
ROUTED_HISTORY = 256  # per prefill worker: enough for any realistic number in flight
IN_FLIGHT_TOKENS = 256  # assumed prefill work of an in-flight request whose size this router did not record


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
    return w.in_flight * IN_FLIGHT_TOKENS + w.load.num_queued_tokens


def num_ended(w: Worker) -> int:
    """This router's requests on ``w`` at its last poll that have ended since (net of those started)."""
    return max(0, w.in_flight_at_poll - w.in_flight)


def fresh_waiting(w: Worker) -> int:
    """The poll's waiting count, less this router's requests that ended since: right after a burst the poll
    still shows the burst queued, though its requests are gone (then an idle cluster would look full)."""
    return max(0, w.load.num_waiting - num_ended(w))


def fresh_queued_tokens(w: Worker) -> int:
    """The poll's queued tokens, scaled down by the share of this router's in-flight requests at the poll that have
    ended since (all of them: none is left; with other routers' work in the queue this errs low, until the next
    poll, at most ``poll_interval_s`` later)."""
    ended = num_ended(w)
    if not ended:
        return w.load.num_queued_tokens
    return w.load.num_queued_tokens * w.in_flight // w.in_flight_at_poll


def _decode_load(w: Worker) -> float:
    total = max(1, w.load.num_total_blocks)
    return w.in_flight + w.load.num_running + w.load.num_waiting + (1 - w.load.num_free_blocks / total)


def _stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def kv_bytes_per_token(load: WorkerLoad) -> float:
    """KV bytes one token takes over all layers, from the worker's layout (0 when it has none)."""
    fp = load.fingerprint
    if fp is None:
        return 0.0
    try:
        return fp.block_bytes() / fp.block_size * fp.num_layers
    except ValueError:  # a dtype this router does not know
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
        self._routed: dict[str, deque[int]] = {}  # prefill address -> uncached tokens of the latest requests sent
        self._kv_layout = None  # the layout ``costs.kv_bytes_per_token`` was computed for

    def choose(self, req: RouteRequest, prefills: list[Worker], decodes: list[Worker]) -> Decision:
        """Raises LookupError when no decode worker is available."""
        if not decodes:
            raise LookupError("no decode worker is available")
        prefills = sorted(prefills, key=lambda w: w.address)
        decodes = sorted(decodes, key=lambda w: w.address)
        fp = decodes[0].load.fingerprint  # the request's pool (one per base model): its KV size per token
        if fp is not self._kv_layout:
            self._kv_layout, self.costs.kv_bytes_per_token = fp, kv_bytes_per_token(decodes[0].load)
        overlap = self.index.overlap(req.block_hashes, [w.address for w in prefills + decodes])
        if self.name == "cache_aware" and prefills:
            local = self._local_by_affinity(req, decodes, overlap)
            if local is not None:
                return local
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
            ttft = self.costs.prefill_s(decode.address, fresh_queued_tokens(decode), local_uncached)
            return Decision(None, decode, ttft + self.costs.decode_s(decode.load, fresh_waiting(decode)),
                            overlap.get(decode.address, 0), reason)
        cached = overlap.get(prefill.address, 0)
        self._routed.setdefault(prefill.address, deque(maxlen=ROUTED_HISTORY)).append(
            max(1, req.prompt_len - cached * self.block_size))
        return Decision(prefill, decode, self.predict(req, prefill, decode, overlap), cached, reason)

    # ---- scoring ----------------------------------------------------------------------------------
    def queued_tokens(self, p: Worker) -> int:
        """Prefill work ahead of a new request on ``p``: the worker's last reported queue plus the uncached
        tokens of the requests this router has in flight there (the newest ``in_flight`` it routed to ``p``;
        IN_FLIGHT_TOKENS each for any it has no record of). The reported queue is made fresh first
        (``fresh_queued_tokens``)."""
        n = p.in_flight
        recent = self._routed.get(p.address, ())
        known = min(n, len(recent))
        in_flight = sum(itertools.islice(reversed(recent), known)) + (n - known) * IN_FLIGHT_TOKENS
        return fresh_queued_tokens(p) + in_flight

    def _queue_s(self, p: Worker) -> float:
        return self.costs.prefill_s(p.address, self.queued_tokens(p), 0)

    def predict(self, req: RouteRequest, p: Worker, d: Worker, overlap: dict[str, int]) -> float:
        uncached = max(1, req.prompt_len - overlap.get(p.address, 0) * self.block_size)
        queued = self.queued_tokens(p)
        return (
            self.costs.prefill_s(p.address, queued, uncached)
            + self.costs.transfer_s(topology(p.load, d.load), req.prompt_len)
            + self.costs.decode_s(d.load, fresh_waiting(d))
            + d.in_flight * 1e-4
        )

    def _local_by_affinity(self, req: RouteRequest, decodes: list[Worker], overlap: dict[str, int]) -> Decision | None:
        """cache_aware's conditional disaggregation: the decode workers on which the uncached part of the prompt
        is at most ``local_prefill_tokens`` (typically the one that streamed the previous turn of a conversation,
        answer included) are candidates for a local prefill; the one with the lowest predicted TTFT wins. Plain
        conditional disaggregation only looks at the decode worker the pair score picked, which in a pool of
        several decode workers is rarely the one holding the conversation."""
        best: tuple[float, str, Worker] | None = None
        for d in decodes:
            uncached = req.prompt_len - overlap.get(d.address, 0) * self.block_size
            if uncached > self.local_prefill_tokens:
                continue
            ttft = (self.costs.prefill_s(d.address, fresh_queued_tokens(d), uncached)
                    + self.costs.decode_s(d.load, fresh_waiting(d)) + d.in_flight * 1e-4)
            best = min(best, (ttft, d.address, d)) if best is not None else (ttft, d.address, d)
        if best is None:
            return None
        ttft, _, d = best
        return Decision(None, d, ttft, overlap.get(d.address, 0), "short uncached prompt")

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
