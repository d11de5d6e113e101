"""Fixed-size KV block bookkeeping: ref counts, an LRU free queue and a prefix cache by block hash.

The pool only tracks ids; the tensors live in ``engine.kv_cache``. A block with ref count 0 sits in the
free queue. If it still carries a hash it is a cached block: a later request with the same prefix can
``touch`` it back. ``allocate`` takes blocks from the front of the queue (least recently freed) and
evicts their hash. ``free`` appends a request's blocks tail-first, so the end of a prompt is evicted
before its shared head. A cached block may carry a tag (the LoRA adapter it was computed under) so that
``drop_tagged`` can forget every block of one adapter at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class KVEvent:
    """A change to the prefix cache, streamed to routers: kind is 'stored', 'evicted' or 'cleared'."""

    kind: str
    block_hashes: list[int]


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True, record_events: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.block_tag: dict[int, str] = {}  # block id -> tag, for tagged cached blocks only
        self.record_events = record_events
        self.events: list[KVEvent] = []

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_queue)

    def find_cached_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes`` (does not touch them)."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        for h in block_hashes:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    # ---- mutations -----------------------------------------------------------------------------
    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for b in block_ids:
            if self.ref_cnt[b] == 0:
                del self.free_queue[b]
            self.ref_cnt[b] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self.free_queue):
            raise MemoryError(f"need {num_blocks} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(num_blocks):
            b, _ = self.free_queue.popitem(last=False)
            self._evict_hash(b)
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue tail-first."""
        for b in reversed(block_ids):
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None

    def cache_block(self, block_id: int, block_hash: int, tag: str | None = None) -> None:
        """Register a full, computed block under its hash so later prompts can reuse it."""
        if not self.enable_prefix_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self.cached:  # an identical block exists already; keep the first
            return
        self.block_hash[block_id] = block_hash
        self.cached[block_hash] = block_id
        if tag is not None:
            self.block_tag[block_id] = tag
        if self.record_events:
            self.events.append(KVEvent("stored", [block_hash]))

    def drop_tagged(self, tag: str) -> int:
        """Forget the hash of every block cached under ``tag`` (free ones and ones still in use: neither is found
        by a later prefix lookup), with an 'evicted' event each. Returns how many were dropped."""
        blocks = [b for b, t in self.block_tag.items() if t == tag]
        for b in blocks:
            self._evict_hash(b)
        return len(blocks)

    def reset_prefix_cache(self) -> None:
        for b in list(self.cached.values()):
            self.block_hash[b] = None
        self.cached.clear()
        self.block_tag.clear()
        if self.record_events:
            self.events.append(KVEvent("cleared", []))

    def drain_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def _evict_hash(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is None:
            return
        self.block_hash[block_id] = None
        self.block_tag.pop(block_id, None)
        if self.cached.get(h) == block_id:
            del self.cached[h]
        if self.record_events:
            self.events.append(KVEvent("evicted", [h]))

    # ---- checks --------------------------------------------------------------------------------
    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Raise AssertionError if the pool's invariants do not hold.

        ``expected_refs`` (block id -> count held by live requests) checks that no block leaked.
        """
        for b in range(self.num_blocks):
            rc = self.ref_cnt[b]
            assert rc >= 0, f"block {b}: negative ref count {rc}"
            assert (rc == 0) == (b in self.free_queue), (
                f"block {b}: ref {rc} but in_free_queue={b in self.free_queue}"
            )
            h = self.block_hash[b]
            if h is not None:
                assert self.cached.get(h) == b, f"block {b}: hash {h:#x} not mapped back"
        for b in self.block_tag:
            assert self.block_hash[b] is not None, f"block {b}: tagged {self.block_tag[b]!r} but not cached"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, (
                f"cached hash {h:#x} -> block {b} whose hash is {self.block_hash[b]}"
            )
        assert len(self.free_queue) + sum(1 for rc in self.ref_cnt if rc > 0) == self.num_blocks
        if expected_refs is not None:
            for b in range(self.num_blocks):
                want = expected_refs.get(b, 0)
                assert self.ref_cnt[b] == want, f"block {b}: ref {self.ref_cnt[b]}, live requests hold {want}"
