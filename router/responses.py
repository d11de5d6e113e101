"""What the router keeps per request while it runs, and the client responses built from it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.request import ClientRequest
from pdserve.serving.convert import set_stop_reason, stop_reason_of


@dataclass(slots=True)
class RouterCounters:
    requests: int = 0
    retries: int = 0
    migrations: int = 0
    cancelled: int = 0
    local_prefills: int = 0
    failed: int = 0


@dataclass(slots=True)
class RequestState:
    request: ClientRequest
    prompt: list[int]
    sent: list[int] = field(default_factory=list)  # tokens already relayed to the client
    hashes: list[int] = field(default_factory=list)  # leading block hashes of prompt + sent (lazy, see failover)
    hash_layout: tuple[int, int] = (0, 0)  # (block_size, hash_seed) ``hashes`` were computed with
    t_start: float = field(default_factory=time.monotonic)
    t_prefill_start: float = 0.0
    t_first_token: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    num_cached_tokens: int = 0
    prefill_worker: str = ""
    decode_worker: str = ""
    attempts: int = 0

    @classmethod
    def of(cls, request: ClientRequest) -> RequestState:
        return cls(request, list(request.token_ids))

    @property
    def rid(self) -> str:
        """The id workers and logs know the request by (router-assigned: never the same for two requests)."""
        return self.request.cluster_id or self.request.request_id

    @property
    def client_id(self) -> str:
        """The client's request id, echoed in every response."""
        return self.request.request_id

    @property
    def remaining_tokens(self) -> int:
        return self.request.sampling.max_tokens - len(self.sent)

    def tokens(self) -> list[int]:
        """What a (re-)prefill computes: the prompt plus every token already sent."""
        return self.prompt + self.sent if self.sent else self.prompt


def finish(st: RequestState, resp: pb.GenerateResponse, reason: str, now: float) -> tuple[float, float]:
    """Fill the final message's usage, workers and timings; -> (first_token_s, total_s)."""
    resp.finish_reason = reason
    usage = resp.usage
    usage.prompt_tokens = len(st.prompt)
    usage.completion_tokens = len(st.sent)
    usage.cached_prompt_tokens = st.num_cached_tokens
    resp.prefill_worker = st.prefill_worker
    resp.decode_worker = st.decode_worker
    resp.model = st.request.model
    first_token_s, total_s = (st.t_first_token or now) - st.t_start, now - st.t_start
    timings = resp.timings
    timings.queue_s = max(0.0, (st.t_prefill_start or now) - st.t_start)
    timings.prefill_s = st.prefill_s
    timings.transfer_s = st.transfer_s
    timings.first_token_s = first_token_s
    timings.total_s = total_s
    return first_token_s, total_s


class Aggregate:
    """Complete's answer: the streamed responses folded into one."""

    def __init__(self) -> None:
        self.total: pb.GenerateResponse | None = None
        self.texts: list[str] = []  # joined once at the end: += on a proto string field is quadratic

    def add(self, resp: pb.GenerateResponse) -> None:
        self.texts.append(resp.text)
        total = self.total
        if total is None:  # usually the only chunk of a short completion: take it as it is
            self.total = resp
            return
        total.request_id = resp.request_id
        total.token_ids.extend(resp.token_ids)
        total.logprobs.extend(resp.logprobs)
        if resp.finish_reason:
            total.finish_reason = resp.finish_reason
            total.usage.CopyFrom(resp.usage)
            total.timings.CopyFrom(resp.timings)
            total.prefill_worker = resp.prefill_worker
            total.decode_worker = resp.decode_worker
            total.model = resp.model
            total.cached = resp.cached
            total.cache_similarity = resp.cache_similarity
            set_stop_reason(total, stop_reason_of(resp))

    def result(self) -> pb.GenerateResponse:
        if self.total is None:
            return pb.GenerateResponse()
        if len(self.texts) > 1:
            self.total.text = "".join(self.texts)
        return self.total
