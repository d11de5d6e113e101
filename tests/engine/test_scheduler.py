"""Scheduler with a real block pool and no model: chunk boundaries, ordering, priorities, preemption.

``Sim`` applies each schedule the way LLMEngine.step does (advance num_computed_tokens, extend the hash
chain and cache full blocks, append a sampled token when the chunk reaches the end, finish and free at
max_tokens), and checks the pool against the blocks live sequences hold after every step.
"""

from __future__ import annotations

import itertools

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus

BS = 4
SAMPLED = 7  # every "sampled" token


class Sim:
    def __init__(self, num_blocks=32, budget=10, max_seqs=8, prefix_caching=True):
        self.pool = BlockPool(num_blocks, enable_prefix_caching=prefix_caching)
        self.sched = Scheduler(self.pool, BS, budget, max_seqs)
        self.arrivals = itertools.count()
        self.finished: list[str] = []
        self.seqs: dict[str, Sequence] = {}

    def add(self, rid, tokens, priority=0, max_tokens=100) -> Sequence:
        s = Sequence(rid, list(tokens), SamplingParams(max_tokens=max_tokens), priority=priority,
                     arrival_seq=next(self.arrivals))
        self.seqs[rid] = s
        self.sched.add(s)
        return s

    def step(self) -> list[tuple[str, int]]:
        out = self.sched.schedule()
        sampling = [s.seq for s in out if s.samples]
        for s in out:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.sched.update_hashes(s.seq)
        for seq in sampling:
            seq.output_token_ids.append(SAMPLED)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.finish(seq)
        self.check()
        return [(s.seq.request_id, s.num_new_tokens) for s in out]

    def finish(self, seq: Sequence) -> None:
        self.sched.remove(seq)
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.status = SequenceStatus.FINISHED
        self.finished.append(seq.request_id)

    def waiting_ids(self) -> list[str]:
        return [s.request_id for _, s in sorted(self.sched.waiting, key=lambda x: x[0])]

    def check(self) -> None:
        refs: dict[int, int] = {}
        for s in self.seqs.values():
            for b in s.block_ids:
                refs[b] = refs.get(b, 0) + 1
        self.pool.check_integrity(refs)
        for s in self.sched.running:
            assert len(s.block_ids) * BS >= s.num_computed_tokens


def distinct(start, n):
    return list(range(start, start + n))


def test_chunked_prefill_boundaries_under_the_token_budget():
    sim = Sim(budget=10)
    sim.add("a", distinct(100, 23), max_tokens=2)
    sim.add("b", distinct(200, 6), max_tokens=2)
    sim.add("c", distinct(300, 12), max_tokens=1)
    assert sim.step() == [("a", 10)]
    assert sim.step() == [("a", 10)]
    assert sim.step() == [("a", 3), ("b", 6), ("c", 1)]  # a's prompt ends; b and c fill the budget
    assert sim.step() == [("a", 1), ("b", 1), ("c", 8)]  # a, b decode first; c's prompt chunk follows
    assert sim.finished == ["a", "b"]
    assert sim.step() == [("c", 3)]
    assert sim.finished == ["a", "b", "c"]
    assert not sim.sched.running and not sim.sched.waiting
    assert sim.pool.num_free_blocks == 32


def test_block_ids_follow_the_chunks():
    sim = Sim(budget=6)
    a = sim.add("a", distinct(100, 9))
    sim.step()
    assert a.block_ids == [0, 1] and a.num_computed_tokens == 6
    b = sim.add("b", distinct(200, 3))
    assert sim.step() == [("a", 3), ("b", 3)]
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3]
    assert a.output_token_ids == [SAMPLED] and b.output_token_ids == [SAMPLED]


def test_decodes_go_before_waiting_prefills_and_max_num_seqs_holds():
    sim = Sim(budget=8, max_seqs=2)
    sim.add("a", distinct(100, 3))
    assert sim.step() == [("a", 3)]
    sim.add("b", distinct(200, 20))
    sim.add("c", distinct(300, 2))
    assert sim.step() == [("a", 1), ("b", 7)]
    assert sim.step() == [("a", 1), ("b", 7)]  # c waits: max_num_seqs is 2
    assert sim.waiting_ids() == ["c"]
    assert sim.step() == [("a", 1), ("b", 6)]
    assert sim.step() == [("a", 1), ("b", 1)]
    assert len(sim.sched.running) == 2


def test_waiting_queue_is_fifo_no_small_request_jumps_a_blocked_one():
    sim = Sim(num_blocks=5, budget=100)
    sim.add("big0", distinct(100, 12), max_tokens=3)  # 3 blocks, 4 once decoding
    assert sim.step() == [("big0", 12)]
    sim.add("big1", distinct(200, 8))  # needs 2 blocks: only 1 free
    sim.add("small", distinct(300, 2))  # would fit, but arrived later
    assert sim.step() == [("big0", 1)]
    assert sim.waiting_ids() == ["big1", "small"]
    assert sim.step() == [("big0", 1)]  # big0 finishes here and frees its blocks
    assert sim.step() == [("big1", 8), ("small", 2)]


def test_priority_higher_first_then_fcfs():
    sim = Sim(budget=100)
    for rid, prio in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 2)]:
        sim.add(rid, distinct(100 * (len(sim.seqs) + 1), 3), priority=prio)
    assert [r for r, _ in sim.step()] == ["high1", "high2", "mid", "low1", "low2"]
    assert [s.request_id for s in sim.sched.running] == ["high1", "high2", "mid", "low1", "low2"]
    sim.add("top", distinct(900, 3), priority=9)
    assert [r for r, _ in sim.step()] == ["high1", "high2", "mid", "low1", "low2", "top"]
    assert [r for r, _ in sim.step()][0] == "top", "running sequences are re-ordered by priority each step"


def test_preemption_by_recompute_frees_blocks_and_keeps_arrival_order():
    sim = Sim(num_blocks=6, budget=100)
    a = sim.add("a", distinct(100, 8), max_tokens=7)
    b = sim.add("b", distinct(200, 8))
    assert sim.step() == [("a", 8), ("b", 8)]
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    assert sim.step() == [("a", 1), ("b", 1)]  # 9 tokens each: one more block each
    assert (a.block_ids, b.block_ids) == ([0, 1, 4], [2, 3, 5]) and sim.pool.num_free_blocks == 0
    c = sim.add("c", distinct(300, 4))  # arrives after b
    for _ in range(3):
        assert sim.step() == [("a", 1), ("b", 1)]
    # a's 13th token needs a 4th block: b, the latest-arrived running sequence, is preempted
    assert sim.step() == [("a", 1)]
    assert sim.sched.num_preemptions == 1 and b.num_preemptions == 1 and a.num_preemptions == 0
    assert b.status is SequenceStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == [SAMPLED] * 5, "generated tokens are kept and recomputed"
    assert a.block_ids == [0, 1, 4, 5], "a took b's tail block, the first freed"
    assert sim.waiting_ids() == ["b", "c"], "b keeps its place ahead of the later c"
    assert list(sim.pool.free_queue) == [3, 2]
    # b's first two blocks are still cached (the third was evicted by a's allocation)
    assert sim.pool.find_cached_prefix(b.block_hashes) == [2, 3]
    assert sim.step() == [("a", 1)]  # a's 7th token: it finishes and frees its blocks
    assert sim.finished == ["a"]
    assert sim.step() == [("b", 5), ("c", 4)], "b recomputes only what its cached prefix does not cover"
    assert b.block_ids == [2, 3, 5, 4] and b.num_computed_tokens == 13 and b.num_cached_tokens == 0
    assert c.block_ids == [1]
    assert b.output_token_ids == [SAMPLED] * 6


def test_preempted_sequence_without_prefix_cache_recomputes_everything():
    sim = Sim(num_blocks=4, budget=100, prefix_caching=False)
    a = sim.add("a", distinct(100, 4), max_tokens=8)
    b = sim.add("b", distinct(200, 4))
    for _ in range(5):  # up to 8 computed tokens each: 2 blocks each, the pool is full
        assert sim.step() in ([("a", 4), ("b", 4)], [("a", 1), ("b", 1)])
    assert sim.pool.num_free_blocks == 0
    assert sim.step() == [("a", 1)]  # a's 9th token needs a third block: b is preempted
    assert b.num_preemptions == 1 and b.num_tokens == 9 and b.block_ids == []
    while "a" not in sim.finished:
        assert sim.step() == [("a", 1)]
    assert sim.step() == [("b", 9)], "no prefix cache: the whole sequence is recomputed"
    assert a.block_ids == []


def test_running_sequence_preempts_itself_when_nothing_else_can_give_way():
    sim = Sim(num_blocks=3, budget=100)
    a = sim.add("a", distinct(100, 8))
    sim.add("hog", distinct(200, 3), priority=5)  # 1 block, room for its next token
    assert sim.step() == [("hog", 3), ("a", 8)]
    assert sim.pool.num_free_blocks == 0
    assert sim.step() == [("hog", 1)]  # a needs a third block; only a itself, the last in order, can give way
    assert a.num_preemptions == 1 and a.block_ids == [] and sim.waiting_ids() == ["a"]


def test_higher_priority_arrival_preempts_lower_priority_running():
    sim = Sim(num_blocks=4, budget=100)
    low = sim.add("low", distinct(100, 15), priority=0)  # 4 blocks, room for its next token
    assert sim.step() == [("low", 15)]
    assert sim.pool.num_free_blocks == 0
    high = sim.add("high", distinct(200, 8), priority=9)
    assert sim.step() == [("high", 8)], "low's decode is dropped from the step it was preempted in"
    assert low.num_preemptions == 1 and low.block_ids == [] and low.num_computed_tokens == 0
    assert high.block_ids == [3, 2], "low's blocks come back tail first"
    assert sim.waiting_ids() == ["low"]
    equal = sim.add("equal", distinct(300, 8), priority=9)
    assert sim.step() == [("high", 1)], "equal priority waits instead of preempting"
    assert equal.status is SequenceStatus.WAITING and high.num_preemptions == 0
    assert sim.waiting_ids() == ["equal", "low"]


def test_priority_preemption_with_a_shared_prefix_counts_the_blocks_it_revives():
    """The victim shares the arrival's cached prefix: preempting it frees those blocks, and touching
    them takes them out of the free queue again, so they must be counted before admitting the arrival.
    (Regression: the count was taken before the preemption and allocate() raised MemoryError.)"""
    sim = Sim(num_blocks=8, budget=100)
    sim.add("keeper", distinct(500, 5), priority=9, max_tokens=3)  # 2 blocks; high cannot preempt it
    low = sim.add("low", distinct(100, 21), priority=0)  # 6 blocks, 5 of them full and cached
    assert sim.step() == [("keeper", 5), ("low", 21)]
    assert sim.pool.num_free_blocks == 0
    high = sim.add("high", distinct(100, 8) + distinct(700, 17), priority=9)  # 25 tokens: 7 blocks
    out = sim.step()  # low is preempted; its 2 shared blocks alone would not make room for high
    assert out == [("keeper", 1)]
    assert low.num_preemptions == 1 and high.status is SequenceStatus.WAITING and high.block_ids == []
    assert sim.waiting_ids() == ["high", "low"]
    assert sim.step() == [("keeper", 1)]  # keeper's 3rd token: it finishes and frees its 2 blocks
    assert sim.finished == ["keeper"]
    assert sim.step() == [("high", 17)], "high gets low's two cached blocks and computes the rest"
    assert high.block_ids == [2, 3, 7, 6, 5, 4, 1] and high.num_cached_tokens == 8
    assert sim.waiting_ids() == ["low"]


def test_prefix_hit_is_capped_so_the_last_token_is_computed():
    sim = Sim(budget=100)
    first = sim.add("first", list(range(1, 13)), max_tokens=1)  # exactly 3 full blocks
    assert sim.step() == [("first", 12)]
    assert sim.finished == ["first"]
    again = sim.add("again", list(range(1, 13)), max_tokens=2)
    # (12 - 1) // 4 = 2 blocks may hit; the last block is recomputed to produce logits
    assert sim.step() == [("again", 4)]
    assert again.num_cached_tokens == 8 and again.block_ids == [0, 1, 3]
    assert first.block_ids == []
    longer = sim.add("longer", list(range(1, 15)), max_tokens=1)  # 3 full blocks + 2 tokens
    assert sim.step() == [("again", 1), ("longer", 2)]
    assert longer.num_cached_tokens == 12
    short = sim.add("short", list(range(1, 4)), max_tokens=1)  # less than a block: nothing to hit
    assert sim.step() == [("short", 3)] and short.num_cached_tokens == 0
    assert sim.finished == ["first", "again", "longer", "short"]
    assert sim.pool.num_free_blocks == 32
