"""LLMEngine: validates requests, runs the schedule -> execute -> sample loop, and applies stops.

Not thread-safe by design: one thread owns an engine (see engine.engine_loop for the service wrapper).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import EngineConfig
from pdserve.engine.connector import KVConnector
from pdserve.engine.errors import CapacityError, InvalidRequestError, RequestNotFoundError
from pdserve.engine.model_runner import BatchItem, ModelRunner
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from pdserve.engine.stops import StopChecker
from pdserve.engine.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger(__name__)


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


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        shared_kv: bool = False,
        record_events: bool = False,
        kv_connector: KVConnector | None = None,
    ):
        self.config = config
        self.kv_connector = kv_connector  # told each step's layers as their KV lands (see engine.connector)
        self.runner = ModelRunner(config, shared_kv=shared_kv)
        self.tokenizer = load_tokenizer(self.runner.model_path)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.geometry.vocab_size
        self.pool = BlockPool(
            self.runner.num_blocks, config.enable_prefix_caching, record_events=record_events
        )
        self.scheduler = Scheduler(
            self.pool, config.block_size, config.max_num_batched_tokens, config.max_num_seqs, config.hash_seed
        )
        self.sampler = Sampler(config.seed, config.device)
        self.eos_token_ids = self._eos_ids()
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.stops: dict[str, StopChecker] = {}
        self.reservations: dict[str, list[int]] = {}
        self.held: dict[str, list[int]] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.last_step_s = 0.0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen = getattr(self.runner.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        return ids

    @property
    def fingerprint(self):
        return self.runner.fingerprint

    # ---- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt: must not be empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token_ids: {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt: {len(token_ids)} tokens leaves no room to generate within max_model_len {self.max_model_len}"
            )
        worst = min(len(token_ids) + params.max_tokens, self.max_model_len)
        need = (worst + self.config.block_size - 1) // self.config.block_size
        if need > self.pool.num_blocks:
            raise InvalidRequestError(
                f"prompt: needs up to {need} KV blocks but the cache has {self.pool.num_blocks}; lower max_tokens"
            )

    def _check_new_id(self, request_id: str) -> None:
        # held: a finished prefill-only request whose blocks a transfer may still be reading
        if request_id in self.seqs or request_id in self.reservations or request_id in self.held:
            raise InvalidRequestError(f"request_id: {request_id!r} is already in use")

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        prefill_only: bool = False,
        sample_offset: int = 0,
    ) -> Sequence:
        self._check_new_id(request_id)
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        seq = Sequence(request_id, token_ids, params, priority=priority, arrival_seq=next(self._arrivals))
        seq.prefill_only = prefill_only
        seq.hold_blocks = prefill_only
        seq.sample_offset = sample_offset
        self._track(seq)
        self.scheduler.add(seq)
        return seq

    def _track(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.detoks[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        self.stops[seq.request_id] = StopChecker(seq.params.stop)

    def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        """Decode side: hold blocks for a prompt whose KV another worker will write."""
        self._check_new_id(request_id)
        need = (num_tokens + self.config.block_size - 1) // self.config.block_size
        if not self.pool.can_allocate(need):
            raise CapacityError(f"need {need} KV blocks, {self.pool.num_free_blocks} free")
        block_ids = self.pool.allocate(need)
        self.reservations[request_id] = block_ids
        return block_ids

    def cancel_reservation(self, request_id: str) -> bool:
        block_ids = self.reservations.pop(request_id, None)
        if block_ids is not None:
            self.pool.free(block_ids)
        return block_ids is not None

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: SamplingParams,
        priority: int = 0,
        first_logprobs: dict[int, float] | None = None,
        num_cached_tokens: int = 0,
        sample_offset: int = 0,
    ) -> StepOutput:
        """Decode side: the prompt's KV already sits in the reserved blocks; continue from its first token.

        Returns the output for the first token (it may already finish the request).
        """
        block_ids = self.reservations.get(request_id)
        if block_ids is None:
            raise RequestNotFoundError(f"request_id: no reservation for {request_id!r}")
        self.validate(prompt_token_ids, params)
        if len(block_ids) * self.config.block_size < len(prompt_token_ids):
            raise InvalidRequestError(
                f"prompt_token_ids: {len(prompt_token_ids)} tokens do not fit the {len(block_ids)} reserved blocks"
            )
        if not 0 <= first_token_id < self.vocab_size:
            raise InvalidRequestError(f"first_token_id: {first_token_id} is outside the vocabulary")
        del self.reservations[request_id]
        seq = Sequence(request_id, list(prompt_token_ids), params, priority=priority, arrival_seq=next(self._arrivals))
        seq.block_ids = block_ids
        seq.num_computed_tokens = len(prompt_token_ids)
        seq.num_cached_tokens = num_cached_tokens
        seq.sample_offset = sample_offset
        self._track(seq)
        self.scheduler.update_hashes(seq)
        out = self._append_token(seq, first_token_id, first_logprobs)
        if out.finished:
            self._finish(seq, out.finish_reason)
        else:
            self.scheduler.add(seq)
        return out

    def abort(self, request_id: str) -> bool:
        """Abort a request or drop a reservation; frees its blocks at once. False if unknown."""
        if self.cancel_reservation(request_id) or self.release(request_id):
            return True
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, FinishReason.ABORT)
        return True

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished prefill-only request held for its transfer."""
        block_ids = self.held.pop(request_id, None)
        if block_ids is not None:
            self.pool.free(block_ids)
        return block_ids is not None

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        items = [
            BatchItem(
                _token_slice(s.seq, s.seq.num_computed_tokens, s.num_new_tokens),
                s.seq.num_computed_tokens,
                s.seq.block_ids,
                s.samples,
            )
            for s in scheduled
        ]
        layer_ready = self.kv_connector.layer_ready(scheduled) if self.kv_connector is not None else None
        logits = self.runner.execute(items, layer_hook=layer_ready)
        sampling = [s for s in scheduled if s.samples]
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.scheduler.update_hashes(s.seq)
        outputs: list[StepOutput] = []
        if sampling:
            results = self.sampler.sample(logits, [s.seq for s in sampling])
            for s, r in zip(sampling, results, strict=True):
                out = self._append_token(s.seq, r.token_id, r.logprobs)
                if out.finished:
                    self._finish(s.seq, out.finish_reason)
                outputs.append(out)
        self.num_steps += 1
        self.last_step_s = time.perf_counter() - t0
        return outputs

    def _append_token(self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None) -> StepOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_token_ids.append(token_id)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        p = seq.params
        reason = None
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            reason = FinishReason.STOP
        elif (
            len(seq.output_token_ids) >= p.max_tokens
            or seq.num_tokens >= self.max_model_len
            or seq.prefill_only
        ):
            reason = FinishReason.LENGTH
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

    def _finish(self, seq: Sequence, reason: FinishReason | None) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.hold_blocks and reason is not FinishReason.ABORT:
            self.held[seq.request_id] = seq.block_ids
        elif seq.block_ids:
            self.pool.free(seq.block_ids)
        seq.block_ids = []
        self.seqs.pop(seq.request_id, None)
        self.detoks.pop(seq.request_id, None)
        self.stops.pop(seq.request_id, None)

    # ---- introspection ----------------------------------------------------------------------------
    def live_block_refs(self) -> dict[int, int]:
        """Block id -> references held by live requests, reservations and held transfers."""
        refs: dict[int, int] = {}
        lists = (
            [s.block_ids for s in self.seqs.values()]
            + list(self.reservations.values())
            + list(self.held.values())
        )
        for ids in lists:
            for b in ids:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.live_block_refs())
