"""Online cost model: predicted time to first token for a (prefill, decode) pair.

    TTFT(p, d) = speed(p) * (overhead_s + (queued_tokens(p) + uncached(p)) * sec_per_token)
               + kv_bytes(prompt_len) / bandwidth(topology(p, d))
               + decode_term(d)
    uncached(p) = prompt_len - cached_blocks(p) * block_size
    decode_term(d) = step_s(d) * (1 + waiting(d)) + kv_pressure_s * usage(d) ** 4

overhead_s and sec_per_token are one fit for the whole pool: exponentially weighted least squares of
measured prefill seconds against uncached tokens (a prefill of few tokens is mostly fixed overhead; a
per-worker tokens/seconds ratio would make the worker with the best cache hits look slowest and starve it).
speed(p) is each worker's measured/predicted ratio (EWMA, clamped to [1/2, 2], learned once the pool fit
has 16 samples) that relaxes back to 1 with a half-life of ``SPEED_HALF_LIFE_S`` when the worker gets no
samples, so a worker that once looked slow is tried again. bandwidth is learned per topology (same GPU < same host < remote) from measured transfers. Defaults
before any measurement are below.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SAME_GPU, SAME_HOST, REMOTE = "same_gpu", "same_host", "remote"
DEFAULT_BANDWIDTH = {SAME_GPU: 400e9, SAME_HOST: 5e9, REMOTE: 1e9}  # bytes/s
DEFAULT_SEC_PER_TOKEN = 2e-4
KV_PRESSURE_S = 1.0
FIT_DECAY = 0.98  # weight of the fit's past per new sample (~50-sample memory)
SPEED_HALF_LIFE_S = 30.0
SPEED_RANGE = (0.5, 2.0)
SPEED_MIN_FIT_SAMPLES = 16  # the pool fit must settle before single samples are judged against it


def topology(prefill_load, decode_load) -> str:
    if prefill_load.host and prefill_load.host == decode_load.host:
        same_dev = prefill_load.device == decode_load.device and prefill_load.device.startswith("cuda")
        return SAME_GPU if same_dev else SAME_HOST
    return REMOTE


@dataclass(slots=True)
class Ewma:
    value: float
    alpha: float = 0.2
    samples: int = 0

    def update(self, x: float) -> None:
        self.value = x if self.samples == 0 else (1 - self.alpha) * self.value + self.alpha * x
        self.samples += 1


@dataclass(slots=True)
class LinearFit:
    """Exponentially weighted least squares of y = intercept + slope * x, both kept >= 0. With too little
    spread in x it is a line through the origin (slope = sum y / sum x)."""

    decay: float = FIT_DECAY
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def update(self, x: float, y: float) -> None:
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y

    def coefficients(self, default_slope: float) -> tuple[float, float]:
        """(intercept, slope)."""
        if self.n == 0 or self.sx <= 0:
            return 0.0, default_slope
        var = self.n * self.sxx - self.sx * self.sx
        if var > 1e-9 * self.n * self.sxx:
            slope = (self.n * self.sxy - self.sx * self.sy) / var
            intercept = (self.sy - slope * self.sx) / self.n
            if slope > 0 and intercept >= 0:
                return intercept, slope
        return 0.0, self.sy / self.sx


@dataclass(slots=True)
class CostModel:
    prefill_fit: LinearFit = field(default_factory=LinearFit)
    speed: dict[str, tuple[Ewma, float]] = field(default_factory=dict)  # worker -> (ratio, last sample time)
    bandwidth: dict[str, Ewma] = field(
        default_factory=lambda: {k: Ewma(v) for k, v in DEFAULT_BANDWIDTH.items()}
    )
    kv_bytes_per_token: float = 0.0
    clock: Callable[[], float] = time.monotonic

    def speed_of(self, worker: str) -> float:
        entry = self.speed.get(worker)
        if entry is None:
            return 1.0
        ratio, at = entry
        relax = 0.5 ** (max(0.0, self.clock() - at) / SPEED_HALF_LIFE_S)
        return math.exp(math.log(ratio.value) * relax)  # geometric pull back toward 1

    def _pool_s(self, tokens: int, with_overhead: bool) -> float:
        intercept, slope = self.prefill_fit.coefficients(DEFAULT_SEC_PER_TOKEN)
        return tokens * slope + (intercept if with_overhead else 0.0)

    def tok_cost(self, worker: str) -> float:
        """Marginal seconds per prefill token on ``worker``."""
        return self.speed_of(worker) * self.prefill_fit.coefficients(DEFAULT_SEC_PER_TOKEN)[1]

    def observe_prefill(self, worker: str, uncached_tokens: int, prefill_s: float) -> None:
        if uncached_tokens <= 0 or prefill_s <= 0:
            return
        predicted = self._pool_s(uncached_tokens, True) if self.prefill_fit.n >= SPEED_MIN_FIT_SAMPLES else 0.0
        self.prefill_fit.update(uncached_tokens, prefill_s)
        if predicted <= 0:
            return
        lo, hi = SPEED_RANGE
        ratio = min(hi, max(lo, prefill_s / predicted))
        prev = self.speed.get(worker)
        ewma = Ewma(self.speed_of(worker), samples=prev[0].samples if prev else 0)  # from the relaxed value
        ewma.update(ratio)  # the first sample sets it
        self.speed[worker] = (ewma, self.clock())

    def prefill_s(self, worker: str, queued_tokens: int, uncached_tokens: int) -> float:
        """Predicted seconds until ``worker`` has prefilled ``uncached_tokens`` behind ``queued_tokens``."""
        return self.speed_of(worker) * self._pool_s(queued_tokens + uncached_tokens, uncached_tokens > 0)

    def observe_transfer(self, topo: str, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            self.bandwidth[topo].update(num_bytes / seconds)

    def transfer_s(self, topo: str, prompt_len: int) -> float:
        return prompt_len * self.kv_bytes_per_token / self.bandwidth[topo].value

    @staticmethod
    def decode_s(load, num_waiting: int | None = None) -> float:
        """``num_waiting``: a fresher count than the poll's (policy.fresh_waiting)."""
        usage = 1 - load.num_free_blocks / load.num_total_blocks if load.num_total_blocks else 0.0
        waiting = load.num_waiting if num_waiting is None else num_waiting
        return load.step_s * (1 + waiting) + KV_PRESSURE_S * usage**4
