"""Serving metrics from per-request records: latency percentiles, throughput, goodput (DistServe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class Record:
    send_time: float
    prompt_len: int
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each streamed message
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each message
    status: str = "OK"
    cached_prompt_tokens: int = 0
    end_time: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def e2e(self) -> float:
        return (self.end_time or self.chunk_times[-1]) - self.send_time

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    def itls(self) -> list[float]:
        """Inter-token latencies: each gap between messages, split evenly over the tokens it carried."""
        out = []
        for i in range(1, len(self.chunk_times)):
            k = max(1, self.chunk_tokens[i])
            out += [(self.chunk_times[i] - self.chunk_times[i - 1]) / k] * k
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def dist(xs: list[float]) -> dict:
    return {
        "mean": sum(xs) / len(xs) if xs else float("nan"),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "n": len(xs),
    }


def summarize(records: list[Record], duration_s: float | None = None, slo_ttft_s: float = 1.0,
              slo_tpot_s: float = 0.1) -> dict:
    ok = [r for r in records if r.ok and r.chunk_times]
    if duration_s is None:
        start = min((r.send_time for r in records), default=0.0)
        end = max((r.e2e + r.send_time for r in ok), default=start)
        duration_s = max(end - start, 1e-9)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    good = [r for r in ok if r.ttft <= slo_ttft_s and (r.tpot is None or r.tpot <= slo_tpot_s)]
    prompt = sum(r.prompt_len for r in ok)
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "duration_s": duration_s,
        "ttft_s": dist([r.ttft for r in ok]),
        "tpot_s": dist([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": dist([x for r in ok for x in r.itls()]),
        "e2e_s": dist([r.e2e for r in ok]),
        "throughput": {
            "requests_per_s": len(ok) / duration_s,
            "input_tokens_per_s": prompt / duration_s,
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s,
        },
        "goodput": {
            "slo_ttft_s": slo_ttft_s,
            "slo_tpot_s": slo_tpot_s,
            "share": len(good) / len(records) if records else 0.0,
            "requests_per_s": len(good) / duration_s,
        },
        "errors": errors,
        "cached_prompt_token_share": (sum(r.cached_prompt_tokens for r in ok) / prompt) if prompt else 0.0,
    }
