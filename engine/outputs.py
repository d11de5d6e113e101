"""Turns each sampled token into a ``StepOutput``: incremental detokenization, stop strings, EOS, stop token ids
and length limits decide the text delta and whether the request finishes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.engine.sequence import FinishReason, Sequence
from pdserve.engine.stops import StopChecker
from pdserve.engine.tokenizer import IncrementalDetokenizer


@dataclass(slots=True)
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


def eos_token_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS id plus whatever the model's generation config names as EOS."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    return ids


class OutputProcessor:
    """Per-request detokenizer and stop checker; ``append_token`` records a token and says what it produced."""

    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.stops: dict[str, StopChecker] = {}

    def track(self, seq: Sequence) -> None:
        self.detoks[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        self.stops[seq.request_id] = StopChecker(seq.params.stop)

    def untrack(self, request_id: str) -> None:
        self.detoks.pop(request_id, None)
        self.stops.pop(request_id, None)

    def append_token(self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None) -> StepOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_token_ids.append(token_id)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        reason = self._finish_reason(seq, token_id)
        detok = self.detoks[seq.request_id]
        text = detok.push(token_id) + (detok.flush() if reason is not None else "")
        stop = self.stops[seq.request_id]
        delta = stop.push(text)
        if stop.hit:
            reason = FinishReason.STOP
        if reason is not None:
            delta += stop.flush()
        seq.text = stop.text
        return StepOutput(
            seq.request_id,
            [token_id],
            delta,
            reason is not None,
            reason,
            [logprobs] if logprobs is not None else [],
            len(seq.prompt_token_ids),
            seq.num_cached_tokens,
        )

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Why ``token_id`` (already appended) ends the request, before stop strings; None if it does not."""
        p = seq.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len or seq.prefill_only:
            return FinishReason.LENGTH
        return None
