"""A request as the engine tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from pdserve.engine.lora.adapter import LoRAAdapter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_seq: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    sample_offset: int = 0  # tokens generated before this sequence existed (migration): seeds stay aligned
    lora: LoRAAdapter | None = None  # the adapter it runs under (engine.lora), held until it finishes
    hash_extra: bytes = b""  # extra key of its block hashes: engine.hashing.adapter_extra(adapter name)
    # prefill-only requests stop after the first token and hold their blocks until released
    prefill_only: bool = False
    hold_blocks: bool = False
    # text state for stop strings and streaming
    text: str = ""
    stop_hold: int = 0
    penalty_cache: torch.Tensor | None = None  # engine.penalties: the prompt's distinct ids, made once
    matcher: object = None  # engine.structured: its llguidance matcher when the request has structured_outputs
    prompt_logprobs: list | None = None  # engine.prompt_logprobs: one entry per prompt token after the first
    first_token_time: float | None = None
    scheduled_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)
