"""What the router knows of a worker's load: a frozen snapshot, made from ``pb.WorkerLoad`` once per poll
(``pdserve.router.edge``). Router logic (membership, policy, costs) reads only this type."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.layout import LayoutFingerprint
from pdserve.serving.adapter_records import AdapterRecord


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker_id: str = ""
    role: str = ""
    address: str = ""
    num_running: int = 0
    num_waiting: int = 0
    num_queued_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    step_s: float = 0.0
    draining: bool = False
    fingerprint: LayoutFingerprint | None = None  # None until the worker reports a usable layout
    kv_endpoint: str = ""
    transfer_backend: str = ""
    num_steps: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    num_reserved: int = 0
    max_model_len: int = 0
    vocab_size: int = 0
    num_aborted: int = 0
    host: str = ""
    device: str = ""
    num_batched_tokens: int = 0
    tokens_per_s: float = 0.0
    last_abort_latency_s: float = 0.0
    integrity_error: str = ""
    num_live_blocks: int = 0
    max_num_seqs: int = 0  # 0: not reported (an older worker); no admission bound then
    num_preemptions: int = 0  # engine preemptions since the worker started (engine.priority)
    served_model: str = ""  # the base model the worker serves ("": the router's default)
    adapters: tuple[str, ...] = ()  # LoRA adapters registered on the worker
    resident_adapters: tuple[str, ...] = ()  # those whose weights are resident now
    api_adapters: tuple[AdapterRecord, ...] = ()  # loaded through Admin.LoadAdapter, and tombstones
