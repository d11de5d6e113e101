"""Scheduler with a real block pool and no model: chunk boundaries, ordering, priorities, preemption."""

from __future__ import annotations

from engine.block_pool import BlockPool
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

BS = 4


def make(num_blocks=32, budget=10, max_seqs=8):
    pool = BlockPool(num_blocks)
    return pool, Scheduler(pool, BS, budget, max_seqs)


_arrival = iter(range(10**6))


def seq(rid, n, priority=0, max_tokens=100, base=None):
    """Distinct prompts per request unless ``base`` is shared (so prefix hits happen only on purpose)."""
    k = next(_arrival)
    start = base if base is not None else 1000 * (k + 1)
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), priority=priority,
                    arrival_seq=k)


def run_step(sched):
    """Schedule one step and apply it as the engine would (a sampled token is always 7)."""
    out = sched.schedule()
    for s in out:
        samples = s.samples
        s.seq.num_computed_tokens += s.num_new_tokens
        sched.update_hashes(s.seq)
        if samples:
            s.seq.output_token_ids.append(7)
    return [(s.seq.request_id, s.num_new_tokens) for s in out]


def refs(sched):
    r = {}
    for s in sched.running:
        for b in s.block_ids:
            r[b] = r.get(b, 0) + 1
    return r


def test_chunked_prefill_boundaries_and_decode_first():
    pool, sched = make(budget=10)
    sched.add(seq("a", 23))
    sched.add(seq("b", 6))
    assert run_step(sched) == [("a", 10)]
    assert run_step(sched) == [("a", 10)]
    assert run_step(sched) == [("a", 3), ("b", 6)]  # a finishes its prompt; b fills the rest of the budget
    assert run_step(sched) == [("a", 1), ("b", 1)]  # both decode now
    assert sched.running[0].block_ids == [0, 1, 2, 3, 4, 5]  # 24 tokens -> 6 blocks of 4
    pool.check_integrity(refs(sched))


def test_running_decodes_go_before_waiting_prefills_and_max_seqs():
    pool, sched = make(budget=8, max_seqs=2)
    sched.add(seq("a", 3))
    run_step(sched)
    sched.add(seq("b", 20))
    sched.add(seq("c", 2))
    assert run_step(sched) == [("a", 1), ("b", 7)]
    assert run_step(sched) == [("a", 1), ("b", 7)]  # c waits: max_num_seqs is 2
    assert [s.request_id for _, s in sched.waiting] == ["c"]
    pool.check_integrity(refs(sched))


def test_priority_then_fcfs():
    pool, sched = make(budget=100)
    for rid, prio in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 2)]:
        sched.add(seq(rid, 3, priority=prio))
    assert [r for r, _ in run_step(sched)] == ["high1", "high2", "mid", "low1", "low2"]


def test_preemption_by_recompute_frees_blocks_and_keeps_place():
    pool, sched = make(num_blocks=6, budget=100)
    a, b = seq("a", 8), seq("b", 8)  # 2 blocks each
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert pool.num_free_blocks == 2
    for _ in range(6):  # both grow: 9 tokens need a third block each, 13 a fourth: too many
        run_step(sched)
    assert sched.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0, "the latest arrival is preempted first"
    assert b.status.value == "waiting" and b.block_ids == [] and b.num_computed_tokens == 0
    pool.check_integrity(refs(sched))
    sched.remove(a)
    pool.free(a.block_ids)
    a.block_ids = []
    n_before = b.num_tokens
    out = run_step(sched)
    assert out[0][0] == "b" and out[0][1] < n_before, "b recomputes, reusing its own cached full blocks"
    assert b.num_computed_tokens == n_before and len(b.output_token_ids) == n_before - 8 + 1
    pool.check_integrity(refs(sched))


def test_higher_priority_arrival_preempts_lower_priority_running():
    pool, sched = make(num_blocks=4, budget=100)
    low = seq("low", 16, priority=0)
    sched.add(low)
    run_step(sched)
    assert pool.num_free_blocks == 0
    high = seq("high", 8, priority=9)
    sched.add(high)
    out = run_step(sched)
    assert ("high", 8) in out and low.num_preemptions == 1
    equal = seq("equal", 8, priority=9)
    sched.add(equal)
    assert ("equal", 8) not in run_step(sched), "equal priority waits instead of preempting"
    pool.check_integrity(refs(sched))


def test_prefix_hit_capped_at_len_minus_one():
    pool, sched = make(budget=100)
    first = seq("first", 12, base=1)  # exactly 3 full blocks
    sched.add(first)
    run_step(sched)
    sched.remove(first)
    pool.free(first.block_ids)
    again = seq("again", 12, base=1)
    sched.add(again)
    assert run_step(sched) == [("again", 4)], "2 blocks hit, the last block is recomputed for its logits"
    assert again.num_cached_tokens == 8 and again.block_ids[:2] == first.block_ids[:2]
    longer = Sequence("longer", list(range(1, 15)), SamplingParams(), arrival_seq=next(_arrival))
    sched.add(longer)
    assert run_step(sched)[-1] == ("longer", 2)  # 3 blocks hit (12 tokens), 2 computed
    pool.check_integrity(refs(sched))
