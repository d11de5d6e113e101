"""The prefix-routing benchmark's workload, per-request records, oracle and summary (no cluster, no RPC).

See ``bench.prefix_routing`` for the workload and the oracle definition; this module builds the one, computes
the other from a run's records and summarizes a run.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from pdserve.bench.metrics import dist

ORACLE_DEFINITION = (
    "oracle = one shared prefix cache of infinite size: a request's hit is the number of leading full blocks "
    "of its prompt whose KV any earlier-sent request computed (its prompt, or its answer except the last "
    "token), capped at (prompt_len - 1) // block_size like the engine; oracle_prompts counts prompt KV only "
    "(what the prefill pool can ever hold)"
)
VOCAB = (3, 259)


# ---- workload ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    num_system: int = 4
    system_len: int = 64
    users: int = 48
    turns: int = 5
    user_len: tuple[int, int] = (16, 48)
    out_len: tuple[int, int] = (16, 32)
    seed: int = 0
    shuffle: bool = True  # users in a random order within each turn (else user 0, 1, ... every turn)

    def __post_init__(self) -> None:
        for name in ("num_system", "system_len", "users", "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("user_len", "out_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: need 1 <= lo <= hi, got {lo},{hi}")


@dataclass(slots=True)
class Workload:
    systems: list[list[int]]
    user_texts: list[list[list[int]]]  # [user][turn] -> new user tokens
    out_lens: list[list[int]]  # [user][turn] -> answer length
    order: list[tuple[int, int]]  # (user, turn) in send order

    @classmethod
    def build(cls, cfg: WorkloadConfig) -> Workload:
        rng = random.Random(cfg.seed)

        def ids(n: int) -> list[int]:
            return [rng.randrange(*VOCAB) for _ in range(n)]

        systems = [ids(cfg.system_len) for _ in range(cfg.num_system)]
        user_texts = [[ids(rng.randint(*cfg.user_len)) for _ in range(cfg.turns)] for _ in range(cfg.users)]
        out_lens = [[rng.randint(*cfg.out_len) for _ in range(cfg.turns)] for _ in range(cfg.users)]
        order = []
        for turn in range(cfg.turns):
            users = list(range(cfg.users))
            if cfg.shuffle:
                rng.shuffle(users)
            order += [(u, turn) for u in users]
        return cls(systems, user_texts, out_lens, order)


@dataclass(slots=True)
class TurnRecord:
    user: int
    turn: int
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    status: str = "OK"
    cached_tokens: int = 0
    prefill_worker: str = ""  # empty: the decode worker prefilled locally
    decode_worker: str = ""
    send_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "OK" and bool(self.output)


# ---- oracle and metrics -----------------------------------------------------------------------------
def _chain(tokens: list[int], block_size: int, num_blocks: int) -> list[bytes]:
    """A stable hash chain over the first ``num_blocks`` full blocks (any chain hash will do offline)."""
    out, prev = [], b""
    for i in range(num_blocks):
        block = tokens[i * block_size:(i + 1) * block_size]
        prev = hashlib.blake2b(prev + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest()
        out.append(prev)
    return out


def oracle_hits(records: list[TurnRecord], block_size: int, include_outputs: bool = True) -> list[int]:
    """Cached tokens per request (send order) under one infinite shared prefix cache: see ORACLE_DEFINITION."""
    seen: set[bytes] = set()
    hits = []
    for r in records:
        chain = _chain(r.prompt, block_size, len(r.prompt) // block_size)
        cap = (len(r.prompt) - 1) // block_size
        n = 0
        while n < cap and chain[n] in seen:
            n += 1
        hits.append(n * block_size)
        seen.update(chain)
        if include_outputs and r.output:
            computed = r.prompt + r.output[:-1]  # the last sampled token's KV is never computed
            seen.update(_chain(computed, block_size, len(computed) // block_size))
    return hits


def hit_rate(cached: list[int], prompt_lens: list[int]) -> float:
    total = sum(prompt_lens)
    return sum(cached) / total if total else 0.0


def summarize(records: list[TurnRecord], block_size: int, duration_s: float) -> dict:
    ok = [r for r in records if r.ok]
    lens = [len(r.prompt) for r in ok]
    bound = oracle_hits(records, block_size)
    bound_p = oracle_hits(records, block_size, include_outputs=False)
    ok_idx = [i for i, r in enumerate(records) if r.ok]
    turns = sorted({r.turn for r in ok})
    prefills: dict[str, int] = {}
    for r in ok:
        key = r.prefill_worker or f"local@{r.decode_worker}"
        prefills[key] = prefills.get(key, 0) + 1
    transcript = hashlib.blake2b(digest_size=8)
    for r in sorted(records, key=lambda r: (r.user, r.turn)):
        transcript.update(repr((r.user, r.turn, r.prompt, r.output)).encode())
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "prompt_tokens": sum(lens),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "hit_rate": hit_rate([r.cached_tokens for r in ok], lens),
        "hit_rate_by_turn": {t: hit_rate([r.cached_tokens for r in ok if r.turn == t],
                                         [len(r.prompt) for r in ok if r.turn == t]) for t in turns},
        "oracle_hit_rate": hit_rate([bound[i] for i in ok_idx], lens),
        "oracle_prompts_hit_rate": hit_rate([bound_p[i] for i in ok_idx], lens),
        "requests_over_oracle": sum(1 for i in ok_idx if records[i].cached_tokens > bound[i]),
        "ttft_s": dist([r.ttft_s for r in ok]),
        "e2e_s": dist([r.e2e_s for r in ok]),
        "duration_s": duration_s,
        "requests_per_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": sum(len(r.output) for r in ok) / duration_s if duration_s > 0 else 0.0,
        "local_prefill_share": sum(1 for r in ok if not r.prefill_worker) / len(ok) if ok else 0.0,
        "requests_per_prefill": dict(sorted(prefills.items())),
        "transcript_digest": transcript.hexdigest(),
    }
