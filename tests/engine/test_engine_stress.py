"""Randomised, bounded workloads: late arrivals, priorities, aborts, shared prefixes, tiny pools and budgets.

Every step is followed by a full integrity check (no leaked or double-counted block), and every request
that was not aborted must produce exactly what it produces alone on a roomy engine, greedy or seeded.
"""

from __future__ import annotations

import random

import pytest

from pdserve import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine

_REFERENCE: dict[tuple, list[int]] = {}


def params(max_tokens: int, seed: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0 if seed is None else 1.0, seed=seed, ignore_eos=True)


def alone(tiny_llm, prompt: list[int], max_tokens: int, seed: int | None) -> list[int]:
    key = (tuple(prompt), max_tokens, seed)
    if key not in _REFERENCE:
        _REFERENCE[key] = tiny_llm.generate([prompt], params(max_tokens, seed))[0].token_ids
    return _REFERENCE[key]


@pytest.mark.parametrize("case", range(16))
def test_random_workload_matches_running_alone(tiny_llm, case):
    rng = random.Random(1000 + case)
    bs = rng.choice([4, 8, 16])
    num_blocks = rng.randint(8, 40)
    eng = LLMEngine(EngineConfig(
        "tiny", block_size=bs, num_blocks=num_blocks, max_num_batched_tokens=rng.choice([1, 3, 8, 17, 64, 2048]),
        max_num_seqs=rng.choice([1, 2, 4, 64]),
    ))
    heads = [[rng.randrange(3, 259) for _ in range(120)] for _ in range(3)]
    plan = []
    for i in range(rng.randint(3, 10)):
        n = rng.randint(1, 60)
        cut = rng.randint(0, n)
        prompt = rng.choice(heads)[:cut] + [rng.randrange(3, 259) for _ in range(n - cut)]
        max_tokens = rng.randint(1, 12)
        if (len(prompt) + max_tokens + bs - 1) // bs > num_blocks:
            continue
        plan.append((rng.randint(0, 6), f"r{i}", prompt, max_tokens, rng.randint(0, 2), rng.choice([None, None, 11])))
    outputs: dict[str, list[int]] = {}
    submitted: dict[str, tuple[list[int], int, int | None]] = {}
    aborted: set[str] = set()
    step = 0
    while plan or eng.has_unfinished():
        for item in [p for p in plan if p[0] <= step]:
            _, rid, prompt, max_tokens, priority, seed = item
            eng.add_request(rid, prompt, params(max_tokens, seed), priority=priority)
            outputs[rid] = []
            submitted[rid] = (prompt, max_tokens, seed)
            plan.remove(item)
        if eng.seqs and rng.random() < 0.03:
            rid = rng.choice(sorted(eng.seqs))
            assert eng.abort(rid)
            aborted.add(rid)
        for out in eng.step():
            outputs[out.request_id] += out.new_token_ids
        eng.check_integrity()
        step += 1
        assert step < 3000, "the engine stopped making progress"
    assert eng.pool.num_free_blocks == num_blocks and not eng.seqs
    for rid, toks in outputs.items():
        if rid in aborted:
            continue
        assert toks == alone(tiny_llm, *submitted[rid]), (case, rid)


def test_priority_arrival_sharing_a_victims_prefix(tiny_llm):
    """Engine-level regression for the scheduler's revived-block count: the high-priority arrival shares
    its cached prefix with the running request it preempts. Used to raise MemoryError inside step()."""
    eng = LLMEngine(EngineConfig("tiny", block_size=4, num_blocks=8))
    low_prompt = list(range(100, 121))  # 6 blocks of 4, 5 of them full and cached after its prefill
    submitted = {
        "keeper": (list(range(200, 205)), 3, None),
        "low": (low_prompt, 3, None),
        "high": (low_prompt[:8] + list(range(50, 67)), 2, None),
    }
    eng.add_request("keeper", submitted["keeper"][0], params(3, None), priority=9)
    eng.add_request("low", low_prompt, params(3, None), priority=0)
    outputs = {rid: [] for rid in submitted}
    for out in eng.step():
        outputs[out.request_id] += out.new_token_ids
    assert eng.pool.num_free_blocks == 0
    eng.add_request("high", submitted["high"][0], params(2, None), priority=9)
    while eng.has_unfinished():
        for out in eng.step():
            outputs[out.request_id] += out.new_token_ids
        eng.check_integrity()
    assert eng.scheduler.num_preemptions == 1
    for rid, toks in outputs.items():
        assert toks == alone(tiny_llm, *submitted[rid]), rid
