"""LLMEngine: runs the schedule -> execute -> sample loop over a few small managers.

Requests are checked by ``RequestValidator`` (engine.validation), a step runs in ``Stepper`` (engine.stepper,
with async output), tokens become outputs in ``OutputProcessor`` (engine.outputs), and blocks held across a KV
hand-off live in ``BlockHolds`` (engine.holds). Not thread-safe by design: one thread owns an engine (see
engine.engine_loop for the service wrapper).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import EngineConfig
from pdserve.engine.connector import KVConnector
from pdserve.engine.errors import InvalidRequestError, RequestNotFoundError
from pdserve.engine.hashing import adapter_extra
from pdserve.engine.holds import BlockHolds
from pdserve.engine.lora.registry import AdapterRegistry
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.outputs import OutputProcessor, StepOutput, eos_token_ids
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from pdserve.engine.stepper import Stepper
from pdserve.engine.structured import Grammars
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.engine.validation import RequestValidator

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "StepOutput"]


def _new_seq(request_id: str, token_ids: list[int], params, priority: int, arrival: int, adapter,
             grammars: Grammars, sample_offset: int) -> Sequence:
    """A new sequence; under a LoRA adapter its block hashes carry the adapter's name (engine.hashing); with
    structured outputs, its matcher has consumed the ``sample_offset`` tokens other workers generated."""
    seq = Sequence(request_id, token_ids, params, priority=priority, arrival_seq=arrival, sample_offset=sample_offset)
    seq.lora, seq.hash_extra = adapter, adapter_extra(adapter.name if adapter else None)
    if params.structured_outputs is not None:
        try:
            seq.matcher = grammars.matcher(params.structured_outputs, token_ids[len(token_ids) - sample_offset:])
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
    return seq


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
        self.pool = BlockPool(self.runner.num_blocks, config.enable_prefix_caching, record_events=record_events)
        self.scheduler = Scheduler(
            self.pool, config.block_size, config.max_num_batched_tokens, config.max_num_seqs, config.hash_seed,
            aging_s=config.priority_aging_s, max_loras=config.max_loras if config.enable_lora else 0,
        )
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.runner.model)
        self.sampler = Sampler(config.seed, eos_token_ids=self.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)  # structured outputs
        self.validator = RequestValidator(
            self.tokenizer, self.vocab_size, self.max_model_len, config.block_size, self.pool.num_blocks
        )
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.holds = BlockHolds(self.pool, config.block_size)
        self.seqs: dict[str, Sequence] = {}
        self.reservations = self.holds.reservations  # request id -> reserved block ids (decode side)
        self.held = self.holds.held  # request id -> blocks a transfer may still read (prefill side)
        self._arrivals = itertools.count()
        self.stepper = Stepper(self, config.use_async_output())
        self.lora = AdapterRegistry(self.runner.lora_slots, self.pool, config.max_lora_rank)  # engine.lora
        for name, path in config.lora_modules:
            self.lora.load(name, path)

    @property
    def num_steps(self) -> int:
        return self.stepper.num_steps

    @property
    def last_step_s(self) -> float:
        return self.stepper.last_step_s

    @property
    def fingerprint(self):
        return self.runner.fingerprint

    # ---- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.validator.tokenize(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        self.validator.validate(token_ids, params)

    def _check_new_id(self, request_id: str) -> None:
        # held: a finished prefill-only request whose blocks a transfer may still be reading
        if request_id in self.seqs or request_id in self.holds or request_id in self.outputs.unemitted:
            raise InvalidRequestError(f"request_id: {request_id!r} is already in use")

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        prefill_only: bool = False,
        sample_offset: int = 0,
        lora_name: str | None = None,
    ) -> Sequence:
        self._check_new_id(request_id)
        adapter = self.lora.resolve(lora_name)
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        seq = _new_seq(request_id, token_ids, params, priority, next(self._arrivals), adapter, self.grammars,
                       sample_offset)
        seq.prefill_only = seq.hold_blocks = prefill_only
        self._track(seq)
        self.scheduler.add(seq)
        return seq

    def _track(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.outputs.track(seq)

    def reserve(self, request_id: str, num_tokens: int, priority: int | None = None,
                lora_name: str | None = None) -> list[int]:
        """Decode side: hold blocks for a prompt whose KV another worker will write. With a ``priority``,
        running requests of a lower class are preempted (by recompute) when the blocks are not free. A
        ``lora_name`` is checked here, so an unknown adapter is refused before any block is held."""
        self._check_new_id(request_id)
        self.lora.resolve(lora_name)
        if priority is not None:
            self.scheduler.make_room(self.holds.blocks_for(num_tokens), priority)
        return self.holds.reserve(request_id, num_tokens)

    def cancel_reservation(self, request_id: str) -> bool:
        return self.holds.cancel_reservation(request_id)

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
        lora_name: str | None = None,
    ) -> StepOutput:
        """Decode side: the prompt's KV already sits in the reserved blocks; continue from its first token.

        Returns the output for the first token (it may already finish the request).
        """
        block_ids = self.reservations.get(request_id)
        if block_ids is None:
            raise RequestNotFoundError(f"request_id: no reservation for {request_id!r}")
        adapter = self.lora.resolve(lora_name)  # the decode steps run it
        self.validator.validate_prefilled(prompt_token_ids, first_token_id, len(block_ids), params)
        self.holds.take_reservation(request_id)
        seq = _new_seq(request_id, list(prompt_token_ids), params, priority, next(self._arrivals), adapter,
                       self.grammars, sample_offset)
        seq.block_ids = block_ids
        seq.num_computed_tokens = len(prompt_token_ids)
        seq.num_cached_tokens = num_cached_tokens
        self._track(seq)
        self.scheduler.update_hashes(seq)
        out = self.outputs.append_token(seq, first_token_id, first_logprobs)
        if out.finished:
            self.finish(seq, out.finish_reason)
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
        self.finish(seq, FinishReason.ABORT)
        return True

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished prefill-only request held for its transfer."""
        return self.holds.release(request_id)

    # ---- LoRA adapters (engine.lora.registry); read_adapter is safe off the engine thread, then install_adapter
    def load_adapter(self, name: str, path: str) -> None:
        self.lora.load(name, path)
    def read_adapter(self, name: str, path: str):
        return self.lora.read(name, path)
    def install_adapter(self, adapter) -> None:
        self.lora.install(adapter)
    def unload_adapter(self, name: str) -> bool:
        return self.lora.unload(name)
    def adapters(self) -> list[str]:
        return self.lora.names()

    def has_unfinished(self) -> bool:
        """Work left: a request to run, or outputs of the last step still to make (async output)."""
        return bool(self.scheduler.running or self.scheduler.waiting or self.stepper.recorded)

    def unemitted_ids(self) -> list[str]:
        """Requests that finished in the last step and whose last output the next ``step`` makes."""
        return list(self.outputs.unemitted)

    # ---- the step (engine.stepper) ----------------------------------------------------------------
    def step(self, emit: Callable[[list[StepOutput]], None] | None = None) -> list[StepOutput]:
        """Schedule and run one step; returns its outputs, or hands them to ``emit`` as soon as they are made (then
        returns []). With async output they are the previous step's (engine.stepper)."""
        return self.stepper.step(emit)

    def finish(self, seq: Sequence, reason: FinishReason | None, untrack: bool = True) -> None:
        """Take a request out: its blocks freed (or held for a transfer), its output state dropped; with ``untrack``
        False kept, and the request listed as unemitted, until its last output is made (engine.stepper)."""
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.hold_blocks and reason is not FinishReason.ABORT:
            self.holds.hold(seq.request_id, seq.block_ids)
        elif seq.block_ids:
            self.pool.free(seq.block_ids)
        seq.block_ids = []
        self.seqs.pop(seq.request_id, None)
        if untrack:
            self.outputs.untrack(seq.request_id)
        else:
            self.outputs.unemitted.add(seq.request_id)

    # ---- introspection ----------------------------------------------------------------------------
    def live_block_refs(self) -> dict[int, int]:
        """Block id -> references held by live requests, reservations and held transfers."""
        lists = [s.block_ids for s in self.seqs.values()] + list(self.holds.block_lists())
        return dict(Counter(b for ids in lists for b in ids))

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.live_block_refs())
