"""Workloads: exact lengths, determinism, shared prefixes, and trace replay."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from pdserve.bench import workloads
from pdserve.bench.workloads import LengthDist


def test_uniform_lengths_vocab_and_determinism():
    a = workloads.uniform(200, (64, 128), 16, seed=1, vocab=(10, 20))
    assert [r.token_ids for r in a] == [r.token_ids for r in workloads.uniform(200, (64, 128), 16, seed=1, vocab=(10, 20))]
    assert [r.token_ids for r in a] != [r.token_ids for r in workloads.uniform(200, (64, 128), 16, seed=2, vocab=(10, 20))]
    assert all(64 <= len(r.token_ids) <= 128 and r.output_len == 16 for r in a)
    assert {t for r in a for t in r.token_ids} == set(range(10, 20))
    assert min(len(r.token_ids) for r in a) < 70 and max(len(r.token_ids) for r in a) > 122  # spans the range
    with pytest.raises(ValueError, match="input_len_range"):
        workloads.uniform(1, (10, 5), 16)
    with pytest.raises(ValueError, match="vocab"):
        workloads.uniform(1, (1, 5), 16, vocab=(5, 5))


def test_chat_lengths_are_lognormal_and_clipped():
    dist = LengthDist(median=100, sigma=1.0, min_len=20, max_len=300)
    rng = random.Random(0)
    lens = [dist.sample(rng) for _ in range(5000)]
    assert min(lens) == 20 and max(lens) == 300  # both clips are hit at sigma 1
    assert 90 <= statistics.median(lens) <= 110
    reqs = workloads.chat(300, seed=2, input_dist=LengthDist(50, 0.5, 8, 120), output_dist=LengthDist(20, 0.5, 4, 40))
    assert all(8 <= len(r.token_ids) <= 120 and 4 <= r.output_len <= 40 for r in reqs)
    assert [r.output_len for r in reqs] == [r.output_len for r in workloads.chat(
        300, seed=2, input_dist=LengthDist(50, 0.5, 8, 120), output_dist=LengthDist(20, 0.5, 4, 40))]
    assert 30 < statistics.median(len(r.token_ids) for r in reqs) < 80


def test_length_dist_parse_and_validation():
    assert LengthDist.parse("200,0.8,4,1500", "--input-len-dist") == LengthDist(200, 0.8, 4, 1500)
    with pytest.raises(ValueError, match="--input-len-dist"):
        LengthDist.parse("200,0.8", "--input-len-dist")
    with pytest.raises(ValueError, match="min_len"):
        LengthDist(10, 0.5, 20, 5)
    assert LengthDist(7, 0.0, 1, 10).sample(random.Random(0)) == 7


def test_shared_prefix_sessions_extend_and_share_system_prompts():
    sp = workloads.shared_prefix(100, num_system=2, system_len=64, users=4, turns=3, user_len=8, out_len=5, seed=0)
    assert len(sp) == 12  # users x turns, fewer than asked
    assert [r.tags["turn"] for r in sp] == [0] * 4 + [1] * 4 + [2] * 4
    last: dict[str, list[int]] = {}
    for r in sp:
        prev = last.get(r.session)
        if prev is None:
            assert len(r.token_ids) == 64 + 8
        else:
            assert r.token_ids[: len(prev)] == prev, "each turn extends the session's previous prompt"
            assert len(r.token_ids) == len(prev) + 5 + 8  # + stand-in reply + new user message
        last[r.session] = r.token_ids
    heads = {tuple(r.token_ids[:64]) for r in sp}
    assert len(heads) == 2, "users share their system prompt"
    assert len(workloads.shared_prefix(5, num_system=2, users=4, turns=3, seed=0)) == 5


def test_long_context_lengths():
    reqs = workloads.long_context(3, length=500, out_len=4, seed=1)
    assert [len(r.token_ids) for r in reqs] == [500] * 3 and len({tuple(r.token_ids) for r in reqs}) == 3


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_trace_replay_exact_schedule_and_lengths(tmp_path):
    path = _write(tmp_path / "t.jsonl", [
        {"timestamp": 100.5, "input_len": 8, "output_len": 4},
        {"timestamp": 100.0, "token_ids": [5, 6, 7], "output_len": 2},
        "",
        {"timestamp": 102.25, "prompt": "hello there", "output_len": 1},
        {"timestamp": 100.5, "input_len": 3, "output_len": 9},
    ])
    reqs = workloads.trace(path, vocab=(3, 259))
    assert [r.send_at for r in reqs] == [0.0, 0.5, 0.5, 2.25]
    assert [r.output_len for r in reqs] == [2, 4, 9, 1]
    assert [len(r.token_ids) for r in reqs] == [3, 8, 3, 0]
    assert reqs[0].token_ids == [5, 6, 7]
    assert reqs[3].prompt == "hello there" and reqs[3].prompt_len == 0
    assert all(3 <= t < 259 for r in reqs for t in r.token_ids)
    assert [r.token_ids for r in workloads.trace(path)] == [r.token_ids for r in reqs]


@pytest.mark.parametrize("bad,msg", [
    ('{"timestamp": "x", "input_len": 4, "output_len": 2}', "timestamp"),
    ('{"input_len": 4, "output_len": 2}', "missing field 'timestamp'"),
    ('{"timestamp": 1, "input_len": 4}', "missing field 'output_len'"),
    ('{"timestamp": 1, "input_len": 4, "output_len": 0}', "output_len"),
    ('{"timestamp": 1, "output_len": 2}', "exactly one of"),
    ('{"timestamp": 1, "input_len": 4, "prompt": "hi", "output_len": 2}', "exactly one of"),
    ('{"timestamp": 1, "token_ids": [1, "a"], "output_len": 2}', "token_ids"),
    ('{"timestamp": 1, "input_len": 2.5, "output_len": 2}', "input_len"),
    ('{"timestamp": 1, "input_len": 4, "output_len": 2', "Expecting"),
    ("[1, 2]", "JSON object"),
])
def test_malformed_trace_line_raises_naming_the_line(tmp_path, bad, msg):
    path = _write(tmp_path / "bad.jsonl", ['{"timestamp": 1, "input_len": 4, "output_len": 2}', bad])
    with pytest.raises(ValueError, match="line 2") as e:
        workloads.trace(path)
    assert msg in str(e.value) and "bad.jsonl" in str(e.value)
