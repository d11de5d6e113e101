"""Workloads: what each request asks for (prompt token ids, output length), deterministic for a seed."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class BenchRequest:
    token_ids: list[int]
    output_len: int
    send_at: float | None = None  # trace replay: absolute offset (seconds); else set by the arrival process
    session: str = ""
    tags: dict = field(default_factory=dict)


def _ids(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return [rng.randrange(lo, hi) for _ in range(n)]


def uniform(n: int, in_range: tuple[int, int], out_len: int, seed: int = 0, vocab=(3, 259)) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, rng.randint(*in_range), *vocab), out_len) for _ in range(n)]


def chat(n: int, seed: int = 0, vocab=(3, 259), in_median: int = 200, out_median: int = 100,
         max_in: int = 1500, max_out: int = 400) -> list[BenchRequest]:
    """Chat-like lengths: lognormal input and output lengths (sigma ~0.8), clipped."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        i = min(max_in, max(4, int(rng.lognormvariate(math.log(in_median), 0.8))))
        o = min(max_out, max(1, int(rng.lognormvariate(math.log(out_median), 0.7))))
        reqs.append(BenchRequest(_ids(rng, i, *vocab), o))
    return reqs


def shared_prefix(n: int, num_system: int = 4, system_len: int = 256, users: int = 16, turns: int = 3,
                  user_len: int = 32, out_len: int = 32, seed: int = 0, vocab=(3, 259)) -> list[BenchRequest]:
    """N system prompts x users, multi-turn: each turn's prompt extends the session's previous prompt."""
    rng = random.Random(seed)
    systems = [_ids(rng, system_len, *vocab) for _ in range(num_system)]
    sessions = []
    for u in range(users):
        s = u % num_system
        sessions.append({"name": f"user{u}", "system": s, "history": list(systems[s])})
    reqs: list[BenchRequest] = []
    for turn in range(turns):
        for sess in sessions:
            sess["history"] = sess["history"] + _ids(rng, user_len, *vocab)
            reqs.append(BenchRequest(list(sess["history"]), out_len, session=sess["name"],
                                     tags={"system": sess["system"], "turn": turn}))
            sess["history"] = sess["history"] + _ids(rng, out_len, *vocab)  # stand-in for the reply
            if len(reqs) == n:
                return reqs
    return reqs


def long_context(n: int, length: int = 1800, out_len: int = 16, seed: int = 0, vocab=(3, 259)) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, length, *vocab), out_len) for _ in range(n)]


def trace(path: str | Path, seed: int = 0, vocab=(3, 259)) -> list[BenchRequest]:
    """JSONL, one request per line: {"timestamp": s, "input_len" | "token_ids", "output_len"}."""
    rng = random.Random(seed)
    reqs: list[BenchRequest] = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ts = float(rec["timestamp"])
            out = int(rec["output_len"])
            ids = [int(t) for t in rec["token_ids"]] if "token_ids" in rec else _ids(rng, int(rec["input_len"]), *vocab)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"trace: line {lineno}: {e!r}") from None
        if out <= 0 or not ids:
            raise ValueError(f"trace: line {lineno}: output_len and the prompt must be non-empty")
        reqs.append(BenchRequest(ids, out, send_at=ts))
    t0 = min((r.send_at for r in reqs), default=0.0)
    for r in reqs:
        r.send_at -= t0  # offsets from the earliest request
    reqs.sort(key=lambda r: r.send_at)
    return reqs
