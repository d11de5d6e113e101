"""One engine step: schedule, queue the forward and the sampling, record the tokens, make the outputs.

Async output (EngineConfig.async_output, on for CUDA by default): a step's tokens are recorded at once (the next
step needs them: its inputs, EOS, stop tokens, length limits), but their outputs (text, stop strings, logprob
dicts; engine.outputs) are made by the next step, after its forward and sampling are queued and before their tokens
are read back, so on a GPU that host work overlaps the device's. A request a stop string ends was already
scheduled again: that row's token is dropped. Nothing is queued between steps, so whatever callers do to the
engine then (add, abort, reserve, adapters) never races the model. On CPU the forward runs as it is queued: the
order changes, not the time (bench/overlap_bench.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pdserve.engine import prompt_logprobs
from pdserve.engine.outputs import Recorded, StepOutput
from pdserve.engine.sampler import SampleLaunch, SampleResult
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence
from pdserve.engine.step_inputs import BatchItem

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine


def _token_slice(seq: Sequence, start: int, num: int) -> list[int]:
    """``seq.all_token_ids[start : start + num]`` without building the whole list (a decode step wants one
    token of a sequence that may be thousands long)."""
    prompt, output = seq.prompt_token_ids, seq.output_token_ids
    end = start + num
    if end <= len(prompt):
        return prompt[start:end]
    if start >= len(prompt):
        return output[start - len(prompt) : end - len(prompt)]
    return prompt[start:] + output[: end - len(prompt)]


def _batch_items(scheduled: list[ScheduledSeq]) -> list[BatchItem]:
    """The model runner's view of a step: each scheduled sequence's new tokens and its block table."""
    return [
        BatchItem(
            _token_slice(s.seq, s.seq.num_computed_tokens, s.num_new_tokens),
            s.seq.num_computed_tokens,
            s.seq.block_ids,
            s.samples,
            s.seq.lora,
            prompt_logprobs.wants(s.seq),
        )
        for s in scheduled
    ]


class Stepper:
    """Runs an engine's steps; holds the last step's recorded tokens whose outputs the next step makes."""

    def __init__(self, engine: LLMEngine, async_output: bool):
        self.engine = engine
        self.async_output = async_output
        self.recorded: list[Recorded] = []
        self.num_steps = 0
        self.last_step_s = 0.0

    def step(self, emit: Callable[[list[StepOutput]], None] | None = None) -> list[StepOutput]:
        """Schedule and run one step; returns the outputs made during it, or hands them to ``emit`` as soon as they
        are made (then returns [])."""
        e, t0 = self.engine, time.perf_counter()
        collected: list[StepOutput] = []
        deliver = emit if emit is not None else collected.extend
        recorded, self.recorded = self.recorded, []
        try:  # until the last step's outputs are made, a failure makes them first: they are not lost with this step
            scheduled = e.scheduler.schedule()
            if scheduled:
                layer_ready = e.kv_connector.layer_ready(scheduled) if e.kv_connector is not None else None
                sampling = [s for s in scheduled if s.samples]
                launched = self._launch(_batch_items(scheduled), layer_ready, sampling, scheduled)
        except BaseException:
            deliver(e.outputs.emit_all(recorded, e.finish))
            raise
        if not scheduled:
            deliver(e.outputs.emit_all(recorded, e.finish))
            return collected
        if self.async_output:  # on CUDA the forward only queued kernels: make the last step's outputs meanwhile
            deliver(e.outputs.emit_all(recorded, e.finish))
        recorded = self._record(scheduled, sampling, launched.results() if launched is not None else [])
        if self.async_output:
            self.recorded = recorded
        else:
            deliver(e.outputs.emit_all(recorded, e.finish))
        self.num_steps += 1
        self.last_step_s = time.perf_counter() - t0
        return collected

    def _launch(self, items: list[BatchItem], layer_ready, sampling: list[ScheduledSeq],
                scheduled: list[ScheduledSeq]) -> SampleLaunch | None:
        """The model and the sampler, queued: on CUDA nothing here waits for the device (the static decode step is
        graph-ready, the sampler reads back only in ``results``); on CPU the work runs here. Prompt logprobs (a
        step that has them) are read back here."""
        logits = self.engine.runner.execute(items, layer_hook=layer_ready)
        if any(it.all_logits for it in items):
            logits = prompt_logprobs.split(items, logits, [s.seq for s in scheduled])
        return self.engine.sampler.launch(logits, [s.seq for s in sampling]) if sampling else None

    def _record(self, scheduled: list[ScheduledSeq], sampling: list[ScheduledSeq],
                results: list[SampleResult]) -> list[Recorded]:
        """Account a step that ran: computed tokens, block hashes, the sampled tokens; requests that EOS, a stop token
        or a length limit ends are finished now (their last output comes later). A sequence that finished while the
        step was queued (a stop string, an abort) is skipped: its row was wasted."""
        e = self.engine
        for s in scheduled:
            if not s.seq.is_finished:
                s.seq.num_computed_tokens += s.num_new_tokens
                e.scheduler.update_hashes(s.seq)
        recorded = []
        for s, r in zip(sampling, results, strict=True):
            if not s.seq.is_finished:
                recorded.append(rec := e.outputs.record(s.seq, r.token_id, r.logprobs))
                if rec.reason is not None:
                    e.finish(s.seq, rec.reason, untrack=False)
        return recorded
