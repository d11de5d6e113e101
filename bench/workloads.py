"""Workloads: what each request asks for (prompt, output length), deterministic for a seed.

Prompts are token ids drawn from a seeded RNG in ``vocab`` = [lo, hi), so prompt lengths are exact; a
trace may instead carry a text ``prompt`` (its length is then whatever the router's tokenizer makes of it).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_VOCAB = (3, 259)


@dataclass(slots=True)
class BenchRequest:
    token_ids: list[int]
    output_len: int
    send_at: float | None = None  # trace replay: offset from the first request (s); else the arrival process decides
    session: str = ""  # multi-turn: the session key (sent as session_id for affinity routing)
    tags: dict = field(default_factory=dict)
    prompt: str = ""  # text prompt instead of token_ids (trace replay only)

    @property
    def prompt_len(self) -> int:
        """Exact for token ids; 0 (unknown until the server reports usage) for a text prompt."""
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Lognormal lengths with this median and log-space sigma, clipped to [min_len, max_len]."""

    median: int
    sigma: float
    min_len: int
    max_len: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len/max_len: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if self.median < 1:
            raise ValueError(f"median: must be >= 1, got {self.median}")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma: must be finite and >= 0, got {self.sigma}")

    @classmethod
    def parse(cls, text: str, flag: str) -> LengthDist:
        """``MEDIAN,SIGMA,MIN,MAX`` as given on the command line."""
        try:
            median, sigma, lo, hi = text.split(",")
            return cls(int(median), float(sigma), int(lo), int(hi))
        except ValueError as e:
            raise ValueError(f"{flag}: expected MEDIAN,SIGMA,MIN,MAX (e.g. 200,0.8,4,1500), got {text!r}: {e}") from None

    def sample(self, rng: random.Random) -> int:
        x = rng.lognormvariate(math.log(self.median), self.sigma) if self.sigma > 0 else float(self.median)
        return min(self.max_len, max(self.min_len, round(x)))


CHAT_INPUT = LengthDist(200, 0.8, 4, 1500)
CHAT_OUTPUT = LengthDist(100, 0.7, 1, 400)


def _check_vocab(vocab: tuple[int, int]) -> None:
    lo, hi = vocab
    if not 0 <= lo < hi:
        raise ValueError(f"vocab: need 0 <= lo < hi, got [{lo}, {hi})")


def _ids(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return [rng.randrange(lo, hi) for _ in range(n)]


def uniform(n: int, in_range: tuple[int, int], out_len: int, seed: int = 0,
            vocab: tuple[int, int] = DEFAULT_VOCAB) -> list[BenchRequest]:
    """Prompt lengths uniform in [lo, hi] (inclusive), fixed output length: the GPU baselines' shape."""
    lo, hi = in_range
    if not 1 <= lo <= hi:
        raise ValueError(f"input_len_range: need 1 <= lo <= hi, got {lo},{hi}")
    if out_len < 1:
        raise ValueError(f"output_len: must be >= 1, got {out_len}")
    _check_vocab(vocab)
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, rng.randint(lo, hi), *vocab), out_len) for _ in range(n)]


def chat(n: int, seed: int = 0, vocab: tuple[int, int] = DEFAULT_VOCAB, input_dist: LengthDist = CHAT_INPUT,
         output_dist: LengthDist = CHAT_OUTPUT) -> list[BenchRequest]:
    """Chat-like: lognormal input and output lengths (long right tail), clipped to their [min, max]."""
    _check_vocab(vocab)
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        i, o = input_dist.sample(rng), output_dist.sample(rng)
        reqs.append(BenchRequest(_ids(rng, i, *vocab), o))
    return reqs


def shared_prefix(n: int, num_system: int = 4, system_len: int = 256, users: int = 16, turns: int = 3,
                  user_len: int = 32, out_len: int = 32, seed: int = 0,
                  vocab: tuple[int, int] = DEFAULT_VOCAB) -> list[BenchRequest]:
    """``num_system`` system prompts shared by ``users`` sessions (user u uses prompt u % num_system), each
    ``turns`` turns long. Turn t's prompt = turn t-1's prompt + a stand-in reply of ``out_len`` tokens + a new
    user message of ``user_len`` tokens, so every turn extends the previous one. Ordered turn by turn
    (all users' turn 0, then turn 1, ...), at most ``n`` requests."""
    for name, v in (("num_system", num_system), ("system_len", system_len), ("users", users), ("turns", turns),
                    ("user_len", user_len), ("out_len", out_len)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    _check_vocab(vocab)
    rng = random.Random(seed)
    systems = [_ids(rng, system_len, *vocab) for _ in range(num_system)]
    history = [list(systems[u % num_system]) for u in range(users)]
    reqs: list[BenchRequest] = []
    for turn in range(turns):
        for u in range(users):
            history[u] += _ids(rng, user_len, *vocab)
            reqs.append(BenchRequest(list(history[u]), out_len, session=f"user{u}",
                                     tags={"system": u % num_system, "turn": turn}))
            if len(reqs) == n:
                return reqs
            history[u] += _ids(rng, out_len, *vocab)  # stand-in for the model's reply
    return reqs


def long_context(n: int, length: int = 1800, out_len: int = 16, seed: int = 0,
                 vocab: tuple[int, int] = DEFAULT_VOCAB) -> list[BenchRequest]:
    """Every prompt ``length`` tokens of fresh random ids (no shared prefix), short outputs."""
    if length < 1 or out_len < 1:
        raise ValueError(f"long_context: length and out_len must be >= 1, got {length}, {out_len}")
    _check_vocab(vocab)
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, length, *vocab), out_len) for _ in range(n)]


def _trace_record(rec: object, rng: random.Random, vocab: tuple[int, int]) -> BenchRequest:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    for key in ("timestamp", "output_len"):
        if key not in rec:
            raise ValueError(f"missing field {key!r}")
    ts = rec["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"timestamp: expected a finite number of seconds, got {ts!r}")
    out = rec["output_len"]
    if isinstance(out, bool) or not isinstance(out, int) or out < 1:
        raise ValueError(f"output_len: expected an integer >= 1, got {out!r}")
    given = [k for k in ("prompt", "input_len", "token_ids") if k in rec]
    if len(given) != 1:
        raise ValueError(f"expected exactly one of 'prompt', 'input_len', 'token_ids', got {given or 'none'}")
    if "prompt" in rec:
        prompt = rec["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt: expected a non-empty string, got {prompt!r}")
        return BenchRequest([], out, send_at=float(ts), prompt=prompt)
    if "token_ids" in rec:
        ids = rec["token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                          for t in ids):
            raise ValueError("token_ids: expected a non-empty list of non-negative integers")
        return BenchRequest(list(ids), out, send_at=float(ts))
    n = rec["input_len"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"input_len: expected an integer >= 1, got {n!r}")
    return BenchRequest(_ids(rng, n, *vocab), out, send_at=float(ts))


def trace(path: str | Path, seed: int = 0, vocab: tuple[int, int] = DEFAULT_VOCAB) -> list[BenchRequest]:
    """Replay a JSONL trace, one request per line:
    ``{"timestamp": seconds, "output_len": n, and one of "prompt": text | "input_len": n | "token_ids": [...]}``.

    Send times are offsets from the earliest timestamp, requests sorted by them (stable for ties). Blank lines
    are skipped; anything else malformed raises ``ValueError`` naming the file and line."""
    _check_vocab(vocab)
    rng = random.Random(seed)
    reqs: list[BenchRequest] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                reqs.append(_trace_record(json.loads(line), rng, vocab))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"trace {path}: line {lineno}: {e}") from None
    t0 = min((r.send_at for r in reqs), default=0.0)
    for r in reqs:
        r.send_at -= t0
    reqs.sort(key=lambda r: r.send_at)
    return reqs
