"""Serving metrics from per-request records: latency percentiles, throughput, goodput (DistServe).

Pure functions over ``Record``s (times in seconds on one monotonic clock), so they are testable on
synthetic timestamps. Definitions:

- TTFT = first streamed message - send; E2E = end of stream - send.
- TPOT (per request) = (E2E - TTFT) / (output tokens - 1); undefined for one-token outputs.
- ITL = every gap between consecutive streamed messages, split evenly over the tokens the later one carried
  (a message with k tokens after a gap g contributes k values g/k), pooled over all requests.
- Throughput = successful requests and their input/output tokens per second of the run's duration
  (first send to last response, unless given).
- Goodput (DistServe) = requests that succeeded with TTFT <= SLO and TPOT <= SLO (a one-token output meets
  any TPOT SLO): their share of all requests sent, and their rate per second.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class Record:
    send_time: float
    prompt_len: int
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each streamed message
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each message
    status: str = "OK"  # gRPC status code name, or EMPTY for a stream that ended with no message
    cached_prompt_tokens: int = 0
    end_time: float = 0.0  # stream finished or failed (0: use the last message)
    request_id: str = ""
    output_len: int = 0  # tokens asked for (0: unknown)
    finish_reason: str = ""
    error: str = ""
    prefill_worker: str = ""  # from the last message; empty when the decode worker prefilled locally
    decode_worker: str = ""
    server_ttft_s: float = 0.0  # the router's own view: request received -> first token sent (0: not reported)

    @property
    def ok(self) -> bool:
        return self.status == "OK" and bool(self.chunk_times)

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
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            k = max(1, self.chunk_tokens[i])
            out += [(self.chunk_times[i] - self.chunk_times[i - 1]) / k] * k
        return out

    def meets_slo(self, slo_ttft_s: float, slo_tpot_s: float) -> bool:
        if not self.ok or self.ttft > slo_ttft_s:
            return False
        tpot = self.tpot
        return tpot is None or tpot <= slo_tpot_s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        return cls(**d)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method). NaN for no data."""
    if not 0 <= q <= 100:
        raise ValueError(f"q: must be in [0, 100], got {q}")
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def dist(xs: list[float]) -> dict:
    """mean, p50, p90, p99 and n; the statistics are None (JSON null) when there is no data."""
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    return {
        "mean": sum(xs) / len(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "n": len(xs),
    }


def run_duration(records: list[Record]) -> float:
    """First send to the last response (successful or not); 0 for no records."""
    if not records:
        return 0.0
    start = min(r.send_time for r in records)
    ends = [r.end_time or (r.chunk_times[-1] if r.chunk_times else r.send_time) for r in records]
    return max(ends) - start


def summarize(records: list[Record], duration_s: float | None = None, slo_ttft_s: float = 1.0,
              slo_tpot_s: float = 0.1) -> dict:
    """The run's metrics as a JSON-ready dict (see the module docstring for definitions)."""
    ok = [r for r in records if r.ok]
    if duration_s is None:
        duration_s = run_duration(records)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            code = r.status if r.status != "OK" else "EMPTY"
            errors[code] = errors.get(code, 0) + 1
    num_good = sum(r.meets_slo(slo_ttft_s, slo_tpot_s) for r in ok)
    prompt = sum(r.prompt_len for r in ok)
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_short": sum(1 for r in ok if r.output_len and r.output_tokens != r.output_len),
        "duration_s": duration_s,
        "ttft_s": dist([r.ttft for r in ok]),
        "tpot_s": dist([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": dist([x for r in ok for x in r.itls()]),
        "e2e_s": dist([r.e2e for r in ok]),
        "throughput": {
            "requests_per_s": len(ok) * per_s,
            "input_tokens_per_s": prompt * per_s,
            "output_tokens_per_s": sum(r.output_tokens for r in ok) * per_s,
        },
        "goodput": {
            "slo_ttft_s": slo_ttft_s,
            "slo_tpot_s": slo_tpot_s,
            "share": num_good / len(records) if records else 0.0,
            "requests_per_s": num_good * per_s,
        },
        "errors": dict(sorted(errors.items())),
        "cached_prompt_token_share": sum(r.cached_prompt_tokens for r in ok) / prompt if prompt else 0.0,
        "remote_prefill_share": sum(1 for r in ok if r.prefill_worker) / len(ok) if ok else 0.0,
    }
