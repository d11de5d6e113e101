"""Block pool: exact block ids, LRU eviction order, prefix cache, ref counts, KV events, integrity checks."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdserve.engine.block_pool import BlockPool


def hashes_of(pool: BlockPool) -> dict[int, int]:
    """block id -> hash for every cached block."""
    return {b: h for h, b in pool.cached.items()}


def test_allocate_exact_ids_and_tail_first_free_order():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert a == [0, 1, 2] and b == [3, 4]
    assert pool.num_free_blocks == 3 and pool.num_used_blocks == 5 and pool.usage() == 5 / 8
    pool.check_integrity({0: 1, 1: 1, 2: 1, 3: 1, 4: 1})
    pool.free(a)  # tail first: 2, 1, 0 join the queue behind the never-used 5, 6, 7
    assert list(pool.free_queue) == [5, 6, 7, 2, 1, 0]
    assert pool.ref_cnt == [0, 0, 0, 1, 1, 0, 0, 0]
    assert pool.allocate(4) == [5, 6, 7, 2]
    pool.free(b)
    assert list(pool.free_queue) == [1, 0, 4, 3]
    pool.check_integrity({5: 1, 6: 1, 7: 1, 2: 1})


def test_eviction_order_least_recently_freed_first_and_tail_before_head():
    pool = BlockPool(6, record_events=True)
    x = pool.allocate(3)  # prompt X: three full blocks
    y = pool.allocate(2)  # prompt Y: two full blocks
    for i, blk in enumerate(x):
        pool.cache_block(blk, 100 + i)
    for i, blk in enumerate(y):
        pool.cache_block(blk, 200 + i)
    pool.free(x)  # freed first: evicted first, tail (102) before head (100)
    pool.free(y)
    assert list(pool.free_queue) == [5, 2, 1, 0, 4, 3]
    pool.drain_events()
    evicted = []
    for _ in range(6):
        (blk,) = pool.allocate(1)
        evicted += [h for e in pool.drain_events() for h in e.block_hashes]
        assert pool.block_hash[blk] is None
    assert evicted == [102, 101, 100, 201, 200]  # block 5 carried no hash
    assert pool.cached == {}
    pool.check_integrity({b: 1 for b in range(6)})


def test_touch_revives_cached_blocks_and_refreshes_their_lru_position():
    pool = BlockPool(5)
    x = pool.allocate(3)
    for i, blk in enumerate(x):
        pool.cache_block(blk, 10 + i)
    pool.free(x)
    assert list(pool.free_queue) == [3, 4, 2, 1, 0]
    hit = pool.find_cached_prefix([10, 11, 99])
    assert hit == [0, 1]
    assert list(pool.free_queue) == [3, 4, 2, 1, 0], "find_cached_prefix does not touch"
    pool.touch(hit)  # a new request reuses the cached head
    assert pool.ref_cnt == [1, 1, 0, 0, 0] and list(pool.free_queue) == [3, 4, 2]
    assert hashes_of(pool) == {0: 10, 1: 11, 2: 12}, "touch keeps the hashes"
    pool.check_integrity({0: 1, 1: 1})
    pool.free(hit)  # freed again: now the most recently freed, so evicted last
    assert list(pool.free_queue) == [3, 4, 2, 1, 0]
    assert pool.allocate(3) == [3, 4, 2]
    assert pool.find_cached_prefix([10, 11, 12]) == [0, 1]
    pool.check_integrity({3: 1, 4: 1, 2: 1})


def test_find_cached_prefix_stops_at_first_miss():
    pool = BlockPool(4)
    ids = pool.allocate(3)
    for blk, h in zip(ids, (7, 8, 9), strict=True):
        pool.cache_block(blk, h)
    assert pool.find_cached_prefix([7, 8, 9]) == [0, 1, 2]
    assert pool.find_cached_prefix([7, 8, 9, 10]) == [0, 1, 2]
    assert pool.find_cached_prefix([7, 42, 9]) == [0], "a chain with a gap is a prefix up to the gap"
    assert pool.find_cached_prefix([99, 8, 9]) == [], "a miss on the first block is no hit at all"
    assert pool.find_cached_prefix([]) == []
    pool.check_integrity({0: 1, 1: 1, 2: 1})


def test_ref_counts_with_shared_prefixes():
    pool = BlockPool(6)
    x = pool.allocate(3)
    for i, blk in enumerate(x):
        pool.cache_block(blk, 50 + i)
    hit = pool.find_cached_prefix([50, 51, 77])
    pool.touch(hit)
    y = hit + pool.allocate(1)  # request Y: X's first two blocks + one of its own
    assert y == [0, 1, 3]
    assert pool.ref_cnt == [2, 2, 1, 1, 0, 0]
    pool.check_integrity({0: 2, 1: 2, 2: 1, 3: 1})
    pool.free(x)
    assert pool.ref_cnt == [1, 1, 0, 1, 0, 0]
    assert list(pool.free_queue) == [4, 5, 2], "only X's private tail became free"
    pool.check_integrity({0: 1, 1: 1, 3: 1})
    pool.free(y)
    assert list(pool.free_queue) == [4, 5, 2, 3, 1, 0]
    assert pool.num_free_blocks == 6
    pool.check_integrity({})


def test_double_free_raises_and_leaves_the_pool_consistent():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.free(a)
    with pytest.raises(RuntimeError, match="double free of block 1"):
        pool.free(a)
    assert pool.ref_cnt == [0, 0, 0, 0]
    pool.check_integrity({})


def test_allocate_too_many_raises_without_side_effects():
    pool = BlockPool(3)
    pool.allocate(2)
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    with pytest.raises(MemoryError, match="need 2 blocks, 1 free"):
        pool.allocate(2)
    assert list(pool.free_queue) == [2]
    pool.check_integrity({0: 1, 1: 1})
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_identical_block_is_cached_once_and_caching_can_be_off():
    pool = BlockPool(4, record_events=True)
    a, b = pool.allocate(2)
    pool.cache_block(a, 9)
    pool.cache_block(b, 9)  # same content computed twice: the first copy stays the cached one
    pool.cache_block(a, 10)  # a block keeps the hash it was cached under
    assert pool.cached == {9: a} and pool.block_hash[b] is None and pool.block_hash[a] == 9
    assert [(e.kind, e.block_hashes) for e in pool.drain_events()] == [("stored", [9])]
    pool.check_integrity({a: 1, b: 1})

    off = BlockPool(4, enable_prefix_caching=False, record_events=True)
    x = off.allocate(1)[0]
    off.cache_block(x, 5)
    assert off.cached == {} and off.find_cached_prefix([5]) == [] and off.drain_events() == []
    off.check_integrity({x: 1})


def test_kv_events_stored_evicted_cleared():
    pool = BlockPool(3, record_events=True)
    ids = pool.allocate(2)
    pool.cache_block(ids[0], 0xA)
    pool.cache_block(ids[1], 0xB)
    pool.free(ids)
    assert pool.allocate(2) == [2, 1]  # 2 never held a hash; 1 (hash 0xB, the tail) is evicted
    pool.cache_block(2, 0xC)
    pool.reset_prefix_cache()
    assert pool.cached == {} and pool.block_hash == [None, None, None]
    assert [(e.kind, e.block_hashes) for e in pool.drain_events()] == [
        ("stored", [0xA]),
        ("stored", [0xB]),
        ("evicted", [0xB]),
        ("stored", [0xC]),
        ("cleared", []),
    ]
    assert pool.drain_events() == []
    pool.check_integrity({2: 1, 1: 1})
    quiet = BlockPool(2)
    quiet.cache_block(quiet.allocate(1)[0], 1)
    assert quiet.events == []


def test_check_integrity_catches_leaks_and_corruption():
    def fresh():
        pool = BlockPool(4)
        ids = pool.allocate(2)
        pool.cache_block(ids[0], 0x77)
        pool.check_integrity({0: 1, 1: 1})
        return pool

    with pytest.raises(AssertionError, match="block 1: ref 1, live requests hold 0"):
        fresh().check_integrity({0: 1})  # block 1 leaked: referenced, but no live request holds it
    with pytest.raises(AssertionError, match="block 0: ref 1, live requests hold 2"):
        fresh().check_integrity({0: 2, 1: 1})
    with pytest.raises(AssertionError, match="block 3: ref 0, live requests hold 1"):
        fresh().check_integrity({0: 1, 1: 1, 3: 1})

    pool = fresh()
    pool.ref_cnt[1] = 0  # ref 0 but not in the free queue
    with pytest.raises(AssertionError, match="block 1: ref 0 but in_free_queue=False"):
        pool.check_integrity()
    pool = fresh()
    pool.ref_cnt[2] = 1  # referenced but still in the free queue
    with pytest.raises(AssertionError, match="block 2: ref 1 but in_free_queue=True"):
        pool.check_integrity()
    pool = fresh()
    pool.ref_cnt[0] = -1
    with pytest.raises(AssertionError, match="negative ref count"):
        pool.check_integrity()
    pool = fresh()
    pool.cached[0x77] = 1  # the index points at the wrong block
    with pytest.raises(AssertionError, match="not mapped back"):
        pool.check_integrity()
    pool = fresh()
    pool.block_hash[0] = None  # the index names a block that lost its hash
    with pytest.raises(AssertionError, match="cached hash 0x77 -> block 0"):
        pool.check_integrity()


class PoolModel(RuleBasedStateMachine):
    """Random allocate / free / touch / cache sequences against a plain-list model of the documented rules."""

    N = 6

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(self.N)
        self.free_list = list(range(self.N))  # front = next to allocate
        self.refs = [0] * self.N
        self.hash_of: dict[int, int] = {}  # block -> hash
        self.held: list[list[int]] = []  # block lists owned by live "requests"
        self.next_hash = 1

    @rule(n=st.integers(1, 3))
    def allocate(self, n):
        if n > len(self.free_list):
            with pytest.raises(MemoryError):
                self.pool.allocate(n)
            return
        want, self.free_list = self.free_list[:n], self.free_list[n:]
        for b in want:
            self.refs[b] = 1
            self.hash_of.pop(b, None)
        assert self.pool.allocate(n) == want
        self.held.append(want)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        ids = self.held.pop(i % len(self.held))
        for b in reversed(ids):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_list.append(b)
        self.pool.free(ids)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def cache(self, i):
        ids = self.held[i % len(self.held)]
        for b in ids:
            if b not in self.hash_of:
                self.hash_of[b] = self.next_hash
            self.pool.cache_block(b, self.hash_of[b])
            self.next_hash += 1

    @precondition(lambda self: self.hash_of)
    @rule(i=st.integers(0, 100))
    def touch_cached(self, i):
        blocks = sorted(self.hash_of)
        b = blocks[i % len(blocks)]
        assert self.pool.find_cached_prefix([self.hash_of[b]]) == [b]
        if self.refs[b] == 0:
            self.free_list.remove(b)
        self.refs[b] += 1
        self.pool.touch([b])
        self.held.append([b])

    @invariant()
    def matches_model(self):
        assert list(self.pool.free_queue) == self.free_list
        assert self.pool.ref_cnt == self.refs
        assert hashes_of(self.pool) == self.hash_of
        expected: dict[int, int] = {}
        for ids in self.held:
            for b in ids:
                expected[b] = expected.get(b, 0) + 1
        self.pool.check_integrity(expected)


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
