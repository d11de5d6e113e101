"""Exact prefix index: block hash -> workers holding it, fed by the workers' KV event streams.

Routers keep no state of their own: a restarted router (or a second replica) rebuilds the index from
each worker's snapshot (the first batch of every KVEvents subscription) plus the deltas that follow.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pdserve.protos import pdserve_pb2 as pb

logger = logging.getLogger(__name__)


class PrefixIndex:
    def __init__(self) -> None:
        self.by_hash: dict[int, set[str]] = {}
        self.by_worker: dict[str, set[int]] = {}
        self.last_seq: dict[str, int] = {}

    def apply(self, worker: str, batch: pb.KVEventBatch) -> None:
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


async def follow(index: PrefixIndex, worker: str, stub, stop: asyncio.Event, backoff_s: float = 0.2) -> None:
    """Keep ``worker``'s part of the index in sync; resubscribe (fresh snapshot) after any break."""
    delay = backoff_s
    while not stop.is_set():
        try:
            async for batch in stub.KVEvents(pb.KVEventsRequest()):
                index.apply(worker, batch)
                delay = backoff_s
        except grpc.aio.AioRpcError as e:
            logger.debug("KV events from %s broke: %s", worker, e.code().name)
        except asyncio.CancelledError:
            raise
        index.remove_worker(worker)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, 5.0)
