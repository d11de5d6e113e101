"""Admission control: per-tenant token buckets, a capacity bound per decode worker, SLO-based load shedding.

Rate limits: each tenant has a bucket of ``burst`` requests refilled at ``rate`` requests/s
(``--tenant-rate name=rate[:burst]``, ``--default-rate``); an empty bucket is RESOURCE_EXHAUSTED with the
time until the next token as the retry hint. Shedding: when the best pair's predicted TTFT exceeds
``shed_ttft_s``, the request is refused with RESOURCE_EXHAUSTED and a retry hint instead of queueing
forever. The budget and the capacity bound below depend on the request's class (router.classes: background,
standard, high), so as load rises the lowest class is shed first.

Capacity bound (on by default): a decode worker takes at most ``admission_bound`` sequences: two batches
for standard requests (one running, one waiting behind it; one for background, three for high), a batch being ``max_num_seqs`` or as many requests of this one's size
as its whole KV cache holds, whichever is fewer. A new request goes only to a worker under its bound; when
every worker is at its bound the request is refused at once with RESOURCE_EXHAUSTED and a retry hint
(``retry-after-ms``: one load-poll interval, when this router next hears the workers' load) instead of
queueing to its deadline. The count is fresh (``Worker.num_seqs``): the last poll's running + waiting plus the
net change in this router's own in-flight requests since that poll, so right after a burst, once its
requests have ended, an idle cluster admits again without waiting for the next poll. A worker that has not
reported ``max_num_seqs`` yet, and an idle one, are never refused by the bound. Retries and migrations of an
admitted request are not checked again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.engine.errors import CapacityError
from pdserve.router.classes import BATCHES, SLO_FACTOR, class_of


class AdmissionError(CapacityError):
    """Refused by a rate limit or by load shedding; ``retry_after_s`` is the hint sent to the client."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(f"{message}; retry after {retry_after_s * 1000:.0f} ms")
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(f"tenant rate: rate must be > 0 and burst >= 1, got {self.rate}:{self.burst}")
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float | None = None) -> float:
        """Take one token; return 0 on success, else seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def parse_tenant_rates(specs: list[str]) -> dict[str, tuple[float, float]]:
    """['alice=5:10', 'bob=2'] -> {'alice': (5.0, 10.0), 'bob': (2.0, 2.0)}."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"tenant-rate: expected NAME=RATE[:BURST], got {spec!r}")
        rate_s, _, burst_s = value.partition(":")
        try:
            rate = float(rate_s)
            burst = float(burst_s) if burst_s else max(1.0, rate)
        except ValueError:
            raise ValueError(f"tenant-rate: bad number in {spec!r}") from None
        TokenBucket(rate, burst)  # validates
        out[name] = (rate, burst)
    return out


BATCHES_ADMITTED = BATCHES["standard"]  # per decode worker: the running batch and one waiting behind it


def admission_bound(load, need_blocks: int, priority: int = 0) -> int:
    """The most sequences a decode worker with ``load`` should hold when a request of class ``priority`` arrives
    and requests need ``need_blocks`` KV blocks each (0: no bound known)."""
    if load.max_num_seqs <= 0:
        return 0
    batch = load.max_num_seqs
    if load.num_total_blocks > 0:
        batch = max(1, min(batch, load.num_total_blocks // max(1, need_blocks)))
    return BATCHES[class_of(priority)] * batch


class Admission:
    def __init__(
        self,
        tenant_rates: dict[str, tuple[float, float]] | None = None,
        default_rate: tuple[float, float] | None = None,
        shed_ttft_s: float = 0.0,
        capacity_bound: bool = True,
        retry_after_s: float = 0.5,
    ):
        self.tenant_rates = tenant_rates or {}
        self.default_rate = default_rate
        self.shed_ttft_s = shed_ttft_s
        self.capacity_bound = capacity_bound
        self.retry_after_s = retry_after_s  # the hint when every decode worker is at its bound
        self.buckets: dict[str, TokenBucket] = {}
        self.num_rate_limited = 0
        self.num_shed = 0
        self.num_over_capacity = 0

    def with_room(self, decodes: list, need_blocks: int, priority: int = 0) -> list:
        """The decode workers under their admission bound (see the module docstring); AdmissionError when there
        are workers but none has room. Reads ``w.load`` and ``w.num_seqs`` (router.membership.Worker)."""
        if not self.capacity_bound or not decodes:
            return decodes
        room, full = [], []
        for w in decodes:
            bound, seqs = admission_bound(w.load, need_blocks, priority), w.num_seqs
            (room if not bound or seqs < bound else full).append(w)
        if room:
            return room
        self.num_over_capacity += 1
        self.num_shed += 1
        worst = min(full, key=lambda w: w.num_seqs)
        raise AdmissionError(
            f"every decode worker is at its admission bound (the least loaded holds {worst.num_seqs} sequences, "
            f"bound {admission_bound(worst.load, need_blocks, priority)} for {class_of(priority)} requests)",
            self.retry_after_s,
        )

    def check_rate(self, tenant: str) -> None:
        spec = self.tenant_rates.get(tenant, self.default_rate)
        if spec is None:
            return
        bucket = self.buckets.get(tenant)
        if bucket is None:
            bucket = self.buckets[tenant] = TokenBucket(*spec)
        wait = bucket.take()
        if wait > 0:
            self.num_rate_limited += 1
            raise AdmissionError(f"tenant {tenant!r} is over its rate limit of {spec[0]:g} requests/s", wait)

    def check_slo(self, predicted_ttft_s: float, priority: int) -> None:
        if not self.shed_ttft_s:
            return
        budget = self.shed_ttft_s * SLO_FACTOR[class_of(priority)]
        if predicted_ttft_s > budget:
            self.num_shed += 1
            raise AdmissionError(
                f"predicted time to first token {predicted_ttft_s:.3f}s exceeds the {budget:.3f}s SLO",
                min(5.0, predicted_ttft_s - budget),
            )
