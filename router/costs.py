"""Online cost model: predicted time to first token for a (prefill, decode) pair.

    TTFT(p, d) = (queued_tokens(p) + prompt_len - cached_blocks(p) * block_size) * sec_per_token(p)
               + kv_bytes(prompt_len) / bandwidth(topology(p, d))
               + decode_term(d)
    decode_term(d) = step_s(d) * (1 + waiting(d)) + kv_pressure_s * usage(d) ** 4

sec_per_token is learned per worker from measured prefills (uncached tokens / prefill time, EWMA);
bandwidth is learned per topology (same GPU < same host < remote) from measured transfers. Defaults
before any measurement are below; every measurement moves the estimate by ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SAME_GPU, SAME_HOST, REMOTE = "same_gpu", "same_host", "remote"
DEFAULT_BANDWIDTH = {SAME_GPU: 400e9, SAME_HOST: 5e9, REMOTE: 1e9}  # bytes/s
DEFAULT_SEC_PER_TOKEN = 2e-4
KV_PRESSURE_S = 1.0


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
class CostModel:
    sec_per_token: dict[str, Ewma] = field(default_factory=dict)
    bandwidth: dict[str, Ewma] = field(
        default_factory=lambda: {k: Ewma(v) for k, v in DEFAULT_BANDWIDTH.items()}
    )
    kv_bytes_per_token: float = 0.0

    def tok_cost(self, worker: str) -> float:
        e = self.sec_per_token.get(worker)
        if e is not None and e.samples:
            return e.value
        learned = [x.value for x in self.sec_per_token.values() if x.samples]
        return sum(learned) / len(learned) if learned else DEFAULT_SEC_PER_TOKEN

    def observe_prefill(self, worker: str, uncached_tokens: int, prefill_s: float) -> None:
        if uncached_tokens > 0 and prefill_s > 0:
            self.sec_per_token.setdefault(worker, Ewma(DEFAULT_SEC_PER_TOKEN)).update(prefill_s / uncached_tokens)

    def observe_transfer(self, topo: str, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            self.bandwidth[topo].update(num_bytes / seconds)

    def prefill_s(self, worker: str, queued_tokens: int, uncached_tokens: int) -> float:
        return (queued_tokens + uncached_tokens) * self.tok_cost(worker)

    def transfer_s(self, topo: str, prompt_len: int) -> float:
        return prompt_len * self.kv_bytes_per_token / self.bandwidth[topo].value

    @staticmethod
    def decode_s(load) -> float:
        usage = 1 - load.num_free_blocks / load.num_total_blocks if load.num_total_blocks else 0.0
        return load.step_s * (1 + load.num_waiting) + KV_PRESSURE_S * usage**4
