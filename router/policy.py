"""Pair choice: which (prefill, decode) workers serve a request.

``round_robin`` cycles through pairs; ``least_loaded`` minimises the prefill's queued tokens plus the
router's own in-flight count, and the decode's running sequences and KV usage. Cache-aware scoring is a
separate policy (see the Router issue).
"""

from __future__ import annotations

import itertools

from router.membership import Worker

POLICIES = ("round_robin", "least_loaded")


def _decode_load(w: Worker) -> float:
    total = max(1, w.load.num_total_blocks)
    return w.in_flight + w.load.num_running + w.load.num_waiting + (1 - w.load.num_free_blocks / total)


def _prefill_load(w: Worker) -> float:
    return w.in_flight * 64 + w.load.num_queued_tokens


class PairPolicy:
    def __init__(self, name: str = "round_robin"):
        if name not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES}, got {name!r}")
        self.name = name
        self._counter = itertools.count()

    def choose(self, prefills: list[Worker], decodes: list[Worker]) -> tuple[Worker | None, Worker]:
        """Return (prefill or None for decode-local prefill, decode). Raises LookupError if no decode."""
        if not decodes:
            raise LookupError("no decode worker is available")
        prefills = sorted(prefills, key=lambda w: w.address)
        decodes = sorted(decodes, key=lambda w: w.address)
        if self.name == "round_robin":
            n = next(self._counter)
            p = prefills[n % len(prefills)] if prefills else None
            return p, decodes[n % len(decodes)]
        p = min(prefills, key=_prefill_load) if prefills else None
        return p, min(decodes, key=_decode_load)
