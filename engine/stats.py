"""Engine load snapshots (a torch-free leaf: services convert them to protos)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class LoadStats:
    """A snapshot for load reporting, replaced (never mutated) after every step."""

    num_running: int = 0
    num_waiting: int = 0
    num_queued_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_reserved: int = 0
    step_s: float = 0.0
    num_steps: int = 0
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens sampled (metrics: output tokens/s)
