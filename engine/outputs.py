"""Turns each sampled token into a ``StepOutput``: incremental detokenization, stop strings, EOS, stop token ids
and length limits decide the text delta and whether the request finishes.

In two halves, so the engine can make outputs while its next step runs (async output, engine.engine): ``record``
appends the token and says whether EOS, a stop token or a length limit ends the request (the next step needs
that), ``emit`` makes its text and checks the stop strings (which may end it too)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine import structured
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
    stop_reason: int | str | None = None  # as vLLM's: the stop string or stop token id that ended it (EOS: None)
    prompt_logprobs: list | None = None  # the first output of a request that asked: engine.prompt_logprobs entries


@dataclass(slots=True)
class Recorded:
    """A token already in its sequence (``reason``: what ended the request without looking at text) whose output is
    not made yet."""

    seq: Sequence
    token_id: int
    logprobs: dict[int, float] | None
    reason: FinishReason | None
    count: int  # the sequence's output tokens with this one: stop strings are looked for past ``min_tokens``


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
        self.unemitted: set[str] = set()  # requests that ``record`` ended, their last output not made yet

    def track(self, seq: Sequence) -> None:
        """A migrated request's prompt ends with the ``sample_offset`` tokens another worker already streamed: they
        are replayed, their text discarded, so what that worker still held back (an unfinished character, text that
        might start a stop string) is streamed from here as the uninterrupted request would have."""
        prompt = seq.prompt_token_ids
        prior = 0 if seq.prefill_only else min(seq.sample_offset, len(prompt))  # prefill-only: no text is read
        detok = IncrementalDetokenizer(self.tokenizer, prompt[: len(prompt) - prior])
        stop = StopChecker(seq.params.stop, seq.params.include_stop_str_in_output)
        # the router lowers min_tokens by the tokens streamed: while some remain, none of these was checked
        check = seq.params.min_tokens == 0
        for token_id in prompt[len(prompt) - prior :]:
            stop.push(detok.push(token_id), check)
        self.detoks[seq.request_id], self.stops[seq.request_id] = detok, stop

    def untrack(self, request_id: str) -> None:
        self.detoks.pop(request_id, None)
        self.stops.pop(request_id, None)

    def append_token(self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None) -> StepOutput:
        return self.emit(self.record(seq, token_id, logprobs))

    def record(self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None) -> Recorded:
        """The token's facts, which the next step needs: appended to the sequence, and whether EOS, a stop token or
        a length limit ends the request. Cheap: no text."""
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_token_ids.append(token_id)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        reason = self._finish_reason(seq, token_id)
        if structured.consume(seq, token_id) and reason is not FinishReason.STOP:  # the grammar is complete
            reason = FinishReason.STOP
        return Recorded(seq, token_id, logprobs, reason, len(seq.output_token_ids))

    def emit(self, r: Recorded) -> StepOutput:
        """A recorded token's output: its text delta through the detokenizer and the stop strings, which may end the
        request (STOP) where ``record`` did not."""
        seq, token_id, reason = r.seq, r.token_id, r.reason
        detok = self.detoks[seq.request_id]
        text = detok.push(token_id) + (detok.flush() if reason is not None else "")
        stop = self.stops[seq.request_id]
        delta = stop.push(text, check=r.count > seq.params.min_tokens)  # as vLLM: none matches before min_tokens
        stop_reason: int | str | None = None
        if stop.hit:
            reason, stop_reason = FinishReason.STOP, stop.matched
        elif reason is FinishReason.STOP and token_id in seq.params.stop_token_ids and (
                seq.params.ignore_eos or token_id not in self.eos_token_ids):  # EOS first, as in vLLM
            stop_reason = token_id
        if reason is not None:
            delta += stop.flush()
        seq.text = stop.text
        return StepOutput(
            seq.request_id,
            [token_id],
            delta,
            reason is not None,
            reason,
            [r.logprobs] if r.logprobs is not None else [],
            len(seq.prompt_token_ids),
            seq.num_cached_tokens,
            stop_reason,
            seq.prompt_logprobs if r.count == 1 else None,
        )

    def emit_all(self, recorded: list[Recorded], finish: Callable[[Sequence, FinishReason | None], None]
                 ) -> list[StepOutput]:
        """The outputs of a step's recorded tokens. A request a stop string ends here is ``finish``ed; one that was
        aborted since its token was recorded gets no output; one ``record`` ended (in ``unemitted``) gets its last."""
        outputs: list[StepOutput] = []
        for n, r in enumerate(recorded):
            seq = r.seq
            if r.reason is None and seq.is_finished:
                continue
            try:
                out = self.emit(r)
            except BaseException:
                for rest in recorded[n:]:  # the ended ones: nothing else would untrack them (the rest get aborted)
                    self._drop_unemitted(rest.seq.request_id)
                raise
            if r.reason is not None:
                seq.finish_reason = out.finish_reason  # a stop string in its last text makes it STOP
                self._drop_unemitted(seq.request_id)
            elif out.finished:
                finish(seq, out.finish_reason)
            outputs.append(out)
        return outputs

    def _drop_unemitted(self, request_id: str) -> None:
        if request_id in self.unemitted:
            self.unemitted.discard(request_id)
            self.untrack(request_id)

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Why ``token_id`` (already appended) ends the request, before stop strings; None if it does not."""
        p = seq.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len or seq.prefill_only:
            return FinishReason.LENGTH
        return None
