"""Exact prefix index: block hash -> workers holding it, fed by the workers' KV event streams.

Routers keep no state of their own: a restarted router (or a second replica) rebuilds the index from
each worker's snapshot (the first batch of every KVEvents subscription) plus the deltas that follow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockEvents:
    """One batch of a worker's KV events: a snapshot (every cached block hash) or a delta, in ``seq`` order."""

    seq: int = 0
    snapshot: bool = False
    cleared: bool = False
    stored: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()


class PrefixIndex:
    def __init__(self) -> None:
        self.by_hash: dict[int, set[str]] = {}
        self.by_worker: dict[str, set[int]] = {}
        self.last_seq: dict[str, int] = {}

    def apply(self, worker: str, batch: BlockEvents) -> None:
        if batch.snapshot or batch.cleared:
            self.remove_worker(worker)
        held = self.by_worker.setdefault(worker, set())
        for h in batch.evicted:
            if h in held:
                held.discard(h)
                holders = self.by_hash.get(h)
                if holders is not None:
                    holders.discard(worker)
                    if not holders:
                        del self.by_hash[h]
        for h in batch.stored:
            held.add(h)
            self.by_hash.setdefault(h, set()).add(worker)
        self.last_seq[worker] = batch.seq

    def remove_worker(self, worker: str) -> None:
        for h in self.by_worker.pop(worker, set()):
            holders = self.by_hash.get(h)
            if holders is not None:
                holders.discard(worker)
                if not holders:
                    del self.by_hash[h]
        self.last_seq.pop(worker, None)

    def overlap(self, block_hashes: list[int], workers: list[str]) -> dict[str, int]:
        """Number of leading blocks of ``block_hashes`` cached on each of ``workers``."""
        counts = dict.fromkeys(workers, 0)
        alive = set(workers)
        for i, h in enumerate(block_hashes):
            holders = self.by_hash.get(h)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for w in alive:
                counts[w] = i + 1
        return counts

    def hashes_of(self, worker: str) -> set[int]:
        return set(self.by_worker.get(worker, ()))
