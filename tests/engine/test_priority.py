"""Request classes in the engine: rank with aging, class-gated preemption by recompute, and exact outputs.

Scheduler scenarios run on the model-free ``Sim`` (tests/engine/test_scheduler.py) with explicit arrival
times, and check exact block ids and the pool after every step; the engine scenarios run the tiny model on
a few blocks and compare every preempted request's tokens with a run that had room for it.
"""

from __future__ import annotations

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.priority import may_preempt, rank_key
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus
from tests.engine.helpers import assert_idle
from tests.engine.test_scheduler import Sim, distinct


class AgedSim(Sim):
    """Sim whose sequences arrive at given times (seconds) under ``aging_s``."""

    def __init__(self, aging_s: float, **kw):
        super().__init__(**kw)
        self.sched = Scheduler(self.pool, 4, self.sched.max_num_batched_tokens, self.sched.max_num_seqs,
                               aging_s=aging_s)

    def add_at(self, rid, tokens, t, priority=0, max_tokens=100) -> Sequence:
        s = Sequence(rid, list(tokens), SamplingParams(max_tokens=max_tokens), priority=priority,
                     arrival_seq=next(self.arrivals), arrival_time=t)
        self.seqs[rid] = s
        self.sched.add(s)
        return s


def seq_at(priority, t, n):
    return Sequence(f"s{n}", [1], SamplingParams(), priority=priority, arrival_seq=n, arrival_time=t)


def test_rank_is_priority_plus_age_and_never_flips_while_both_wait():
    low, high, later_high = seq_at(0, 0.0, 0), seq_at(2, 15.0, 1), seq_at(2, 25.0, 2)
    ranked = sorted([low, high, later_high], key=lambda s: rank_key(s, 10.0))
    # effective priority at any time t: low t/10, high 2 + (t-15)/10, later_high 2 + (t-25)/10
    assert ranked == [high, low, later_high]
    assert sorted([later_high, low, high], key=lambda s: rank_key(s, 0)) == [high, later_high, low]
    # a class only preempts a strictly lower class it also outranks
    assert may_preempt(high, low, 10.0) and not may_preempt(later_high, low, 10.0)
    assert not may_preempt(low, high, 10.0) and not may_preempt(later_high, high, 10.0)
    assert may_preempt(later_high, low, 0)


def test_waiting_queue_ages_a_low_class_past_later_high_arrivals():
    sim = AgedSim(aging_s=10.0, num_blocks=32, budget=100, max_seqs=1)
    sim.add_at("runner", distinct(900, 3), 0.0, priority=5, max_tokens=2)
    assert sim.step() == [("runner", 3)]
    sim.add_at("low", distinct(100, 3), 1.0, priority=0, max_tokens=1)
    sim.add_at("high-early", distinct(200, 3), 5.0, priority=1, max_tokens=1)   # key 0.5 - 1 = -0.5
    sim.add_at("high-late", distinct(300, 3), 20.0, priority=1, max_tokens=1)   # key 2.0 - 1 = 1.0 > low's 0.1
    assert sim.waiting_ids() == ["high-early", "low", "high-late"]
    assert sim.step() == [("runner", 1)]
    assert sim.finished == ["runner"]
    served = [sim.step()[0][0] for _ in range(3)]
    assert served == ["high-early", "low", "high-late"]
    assert sim.seqs["low"].block_ids == [] and sim.pool.num_free_blocks == 32


@pytest.mark.parametrize("aging_s, low_served", [(0.0, False), (10.0, True)])
def test_aging_bounds_starvation_under_a_steady_high_stream(aging_s, low_served):
    """One batch slot and a high-class arrival every second: without aging the low request never runs; with
    10 s per level and a one-level gap it runs once arrivals come later than 10 s after it."""
    sim = AgedSim(aging_s=aging_s, num_blocks=64, budget=100, max_seqs=1)
    low = sim.add_at("low", distinct(100, 3), 0.0, priority=0, max_tokens=1)
    order = []
    for t in range(30):
        sim.add_at(f"h{t}", distinct(1000 + 10 * t, 3), float(t) + 0.5, priority=1, max_tokens=1)
        out = sim.step()  # each request is one step: prefill + its only token
        order.append(out[0][0])
    assert (low.status is SequenceStatus.FINISHED) is low_served
    if low_served:
        # h0..h9 arrived within 10 s of low (they outrank it); h10 arrived 10.5 s after it and ranks behind
        assert order.index("low") == 10 and order[:10] == [f"h{t}" for t in range(10)]


def test_aged_low_class_takes_the_next_free_blocks_but_never_evicts_a_higher_class():
    sim = AgedSim(aging_s=10.0, num_blocks=4, budget=100)
    high = sim.add_at("high", distinct(100, 12), 100.0, priority=1, max_tokens=2)  # 3 blocks, 4 to finish
    assert sim.step() == [("high", 12)]
    assert high.block_ids == [0, 1, 2]
    low = sim.add_at("low", distinct(200, 8), 0.0, priority=0, max_tokens=2)  # arrived long ago: ranks first
    assert sim.waiting_ids() == ["low"] and rank_key(low, 10.0) < rank_key(high, 10.0)
    assert sim.step() == [("high", 1)], "a lower class never preempts, however old"
    assert high.num_preemptions == 0 and sim.finished == ["high"]  # its 13th token took block 3, then it ended
    assert sim.step() == [("low", 8)]
    assert low.block_ids == [3, 2], "high's blocks came back tail first"
    assert sim.step() == [("low", 1)]
    assert sim.finished == ["high", "low"] and sim.pool.num_free_blocks == 4


def test_preempted_low_class_keeps_its_tokens_and_place_and_resumes_from_its_cached_prefix():
    sim = AgedSim(aging_s=30.0, num_blocks=6, budget=100)
    low = sim.add_at("low", distinct(100, 12), 0.0, priority=0, max_tokens=4)  # 3 blocks; 4 with its 13th token
    sim.add_at("later", distinct(300, 4), 1.0, priority=0, max_tokens=1)
    assert sim.step() == [("low", 12), ("later", 4)]
    assert sim.finished == ["later"] and low.block_ids == [0, 1, 2]
    assert sim.step() == [("low", 1)]
    assert low.block_ids == [0, 1, 2, 4] and low.output_token_ids == [7, 7]
    high = sim.add_at("high", distinct(500, 15), 2.0, priority=3, max_tokens=2)  # 4 blocks: only 1 free
    assert sim.step() == [("high", 15)], "low's decode is dropped from the step it was preempted in"
    assert low.num_preemptions == 1 and low.status is SequenceStatus.WAITING
    assert low.block_ids == [] and low.num_computed_tokens == 0 and low.output_token_ids == [7, 7]
    assert high.block_ids == [5, 3, 4, 2], "the free queue: 5, later's 3, then low's blocks tail first"
    assert sim.pool.find_cached_prefix(low.block_hashes) == [0, 1], "low's first two full blocks stay cached"
    assert sim.step() == [("high", 1)]
    assert sim.finished == ["later", "high"]
    assert sim.step() == [("low", 6)], "only what the cache lost is recomputed: 14 tokens - 8 cached"
    assert low.block_ids == [0, 1, 2, 4] and low.num_computed_tokens == 14  # high freed 2, 4, 3, 5
    assert low.output_token_ids == [7, 7, 7] and low.num_cached_tokens == 0
    assert sim.step() == [("low", 1)]
    assert sim.finished == ["later", "high", "low"] and sim.pool.num_free_blocks == 6


def test_a_higher_class_takes_a_full_batch_slot_from_the_last_ranked_running_sequence():
    sim = AgedSim(aging_s=30.0, num_blocks=16, budget=100, max_seqs=2)
    low1 = sim.add_at("low1", distinct(100, 5), 0.0, priority=0)
    low2 = sim.add_at("low2", distinct(200, 5), 1.0, priority=0)
    assert sim.step() == [("low1", 5), ("low2", 5)]
    assert (low1.block_ids, low2.block_ids) == ([0, 1], [2, 3])
    high = sim.add_at("high", distinct(300, 6), 2.0, priority=5)
    assert sim.step() == [("low1", 1), ("high", 6)], "low2's decode gives its slot to high"
    assert low2.num_preemptions == 1 and low2.block_ids == [] and low2.output_token_ids == [7]
    assert high.block_ids == [4, 5] and list(sim.pool.free_queue)[-2:] == [3, 2]
    peer = sim.add_at("peer", distinct(400, 3), 3.0, priority=5)
    assert sim.step() == [("high", 1), ("peer", 3)], "then low1, now the last-ranked, gives way"
    assert low1.num_preemptions == 1 and peer.block_ids == [6]
    peer2 = sim.add_at("peer2", distinct(500, 3), 4.0, priority=5)
    assert sim.step() == [("high", 1), ("peer", 1)], "an equal class waits for a slot"
    assert sim.waiting_ids() == ["peer2", "low1", "low2"] and peer2.status is SequenceStatus.WAITING
    assert high.num_preemptions == 0 and peer.num_preemptions == 0


def test_a_reservation_of_a_higher_class_makes_room_and_prefill_only_sequences_are_never_taken():
    sim = AgedSim(aging_s=30.0, num_blocks=6, budget=100)
    pushing = sim.add_at("pushing", distinct(100, 7), 0.0, priority=0)  # 2 blocks, KV on its way out
    pushing.prefill_only = True
    low = sim.add_at("low", distinct(200, 12), 1.0, priority=1)  # 3 blocks
    assert sim.step() == [("low", 12), ("pushing", 7)]
    assert (low.block_ids, pushing.block_ids) == ([0, 1, 2], [3, 4])
    assert not sim.sched.make_room(3, priority=1), "a reservation never preempts its own class"
    assert low.num_preemptions == 0
    assert sim.sched.make_room(3, priority=2)
    assert low.num_preemptions == 1 and low.block_ids == [] and list(sim.pool.free_queue) == [5, 2, 1, 0]
    assert not sim.sched.make_room(5, priority=9), "only prefill-only sequences are left: they are never taken"
    assert pushing.block_ids == [3, 4] and pushing.num_preemptions == 0
    sim.check()
    high = sim.add_at("high", distinct(300, 15), 2.0, priority=9)  # 4 blocks: what low gave back, and 5
    assert sim.step() == [("pushing", 1), ("high", 15)]
    assert high.block_ids == [5, 2, 1, 0] and pushing.num_preemptions == 0 and sim.waiting_ids() == ["low"]


# ---- the engine: a preempted request's tokens are exactly those of an unpreempted run ----------------------
LOW_PROMPTS = [list(range(10, 50)), list(range(60, 88))]
HIGH_PROMPT = list(range(200, 260))
PARAMS = {
    "greedy": SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True),
}


def run(engine: LLMEngine, requests, arrive_after_steps: int | None = None, late=None) -> dict[str, list[int]]:
    """Step ``engine`` until idle; ``late`` (rid, prompt, params, priority) is added after that many steps."""
    tokens: dict[str, list[int]] = {}
    for rid, prompt, params, prio in requests:
        engine.add_request(rid, prompt, params, priority=prio)
    steps = 0
    while engine.has_unfinished() or (late is not None and steps <= arrive_after_steps):
        if late is not None and steps == arrive_after_steps:
            engine.add_request(*late[:3], priority=late[3])
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.check_integrity()
        steps += 1
    assert_idle(engine)
    return tokens


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_preempted_requests_finish_with_exactly_the_tokens_of_an_unpreempted_run(mode):
    params = PARAMS[mode]
    lows = [(f"low{i}", p, params, 0) for i, p in enumerate(LOW_PROMPTS)]
    roomy = LLMEngine(EngineConfig("tiny", block_size=8, num_blocks=64))
    reference = run(roomy, lows + [("high", HIGH_PROMPT, params, 5)])
    # 20 blocks of 8 tokens: the two lows grow to 10 + 9 blocks; the high one needs 8 to 13 on arrival
    tight = LLMEngine(EngineConfig("tiny", block_size=8, num_blocks=20))
    got = run(tight, lows, arrive_after_steps=12, late=("high", HIGH_PROMPT, params, 5))
    assert tight.scheduler.num_preemptions >= 1
    assert got == reference
    assert all(len(t) == 40 for t in got.values())


def test_a_decode_side_reservation_of_a_higher_class_preempts_and_the_low_class_still_finishes_exactly():
    params = PARAMS["seeded"]
    lows = [(f"low{i}", p, params, 0) for i, p in enumerate(LOW_PROMPTS)]
    reference = run(LLMEngine(EngineConfig("tiny", block_size=8, num_blocks=64)), lows)
    tight = LLMEngine(EngineConfig("tiny", block_size=8, num_blocks=16))
    for rid, prompt, p, prio in lows:
        tight.add_request(rid, prompt, p, priority=prio)
    tokens: dict[str, list[int]] = {}
    for _ in range(6):
        for out in tight.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    free = tight.pool.num_free_blocks
    blocks = tight.reserve("incoming", 8 * (free + 2), priority=5)  # 2 blocks more than are free
    assert len(blocks) == free + 2 and tight.scheduler.num_preemptions == 1
    tight.check_integrity()
    with pytest.raises(Exception, match="KV blocks"):
        tight.reserve("same-class", 8 * 16, priority=0)
    assert tight.cancel_reservation("incoming")
    while tight.has_unfinished():
        for out in tight.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        tight.check_integrity()
    assert_idle(tight)
    assert tokens == reference
