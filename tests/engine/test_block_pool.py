"""Block pool: exact block ids, LRU eviction order, prefix cache, ref counts, integrity checks."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool


def test_allocate_free_exact_ids_and_lru_order():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert a == [0, 1, 2] and b == [3, 4]
    assert pool.num_free_blocks == 3
    pool.free(a)  # tail first: 2, 1, 0 join the queue after 5, 6, 7
    assert list(pool.free_queue) == [5, 6, 7, 2, 1, 0]
    assert pool.allocate(4) == [5, 6, 7, 2]
    pool.check_integrity()


def test_cached_blocks_evicted_tail_first_and_touch_revives():
    pool = BlockPool(6, record_events=True)
    ids = pool.allocate(3)
    for i, b in enumerate(ids):
        pool.cache_block(b, 100 + i)  # a prompt of three full blocks: hashes 100, 101, 102
    pool.free(ids)
    pool.check_integrity()
    assert pool.find_cached_prefix([100, 101, 102, 103]) == [0, 1, 2]
    # blocks 3, 4, 5 were never used, then the prompt's tail (2), then its head (1, 0)
    assert pool.allocate(4) == [3, 4, 5, 2]
    assert pool.find_cached_prefix([100, 101, 102]) == [0, 1], "the tail block's hash was evicted first"
    pool.touch([0, 1])
    assert pool.ref_cnt[0] == 1 and 0 not in pool.free_queue
    events = pool.drain_events()
    assert [(e.kind, e.block_hashes) for e in events] == [
        ("stored", [100]), ("stored", [101]), ("stored", [102]), ("evicted", [102]),
    ]
    pool.check_integrity({0: 1, 1: 1, 3: 1, 4: 1, 5: 1, 2: 1})


def test_shared_prefix_ref_counts():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache_block(a[0], 7)
    pool.touch([a[0]])  # a second request shares the first block
    assert pool.ref_cnt[a[0]] == 2
    pool.free(a)
    assert pool.ref_cnt[a[0]] == 1 and a[0] not in pool.free_queue
    pool.free([a[0]])
    assert pool.ref_cnt[a[0]] == 0 and a[0] in pool.free_queue
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a[0]])
    pool.check_integrity()


def test_identical_block_cached_once_and_prefix_caching_off():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, 9)
    pool.cache_block(b, 9)
    assert pool.cached == {9: a} and pool.block_hash[b] is None
    off = BlockPool(4, enable_prefix_caching=False)
    x = off.allocate(1)[0]
    off.cache_block(x, 5)
    assert off.find_cached_prefix([5]) == []


def test_integrity_check_catches_corruption_and_leaks():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.check_integrity({ids[0]: 1, ids[1]: 1})
    with pytest.raises(AssertionError, match="live requests hold"):
        pool.check_integrity({ids[0]: 1})  # block ids[1] leaked: nobody holds it but it is not free
    pool.ref_cnt[ids[0]] = 0  # corrupt: ref 0 but not in the free queue
    with pytest.raises(AssertionError, match="in_free_queue"):
        pool.check_integrity()


def test_allocate_more_than_free_raises_and_reset():
    pool = BlockPool(2)
    with pytest.raises(MemoryError):
        pool.allocate(3)
    assert pool.can_allocate(2) and not pool.can_allocate(3)
    b = pool.allocate(1)[0]
    pool.cache_block(b, 1)
    pool.reset_prefix_cache()
    assert pool.cached == {} and pool.block_hash[b] is None
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
