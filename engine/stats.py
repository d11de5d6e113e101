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


@dataclass(slots=True)
class TokenTotals:
    """Running token counts of an engine loop, and the load snapshot built from them after each step."""

    prompt: int = 0
    hit: int = 0
    generated: int = 0

    def snapshot(self, e) -> LoadStats:
        """``e`` is the engine (read on its own thread)."""
        return LoadStats(
            num_running=len(e.scheduler.running),
            num_waiting=e.scheduler.num_waiting,
            num_queued_tokens=e.scheduler.num_queued_tokens(),
            num_free_blocks=e.pool.num_free_blocks,
            num_total_blocks=e.pool.num_blocks,
            num_reserved=len(e.reservations),
            step_s=e.last_step_s,
            num_steps=e.num_steps,
            num_preemptions=e.scheduler.num_preemptions,
            prefix_hit_tokens=self.hit,
            prompt_tokens=self.prompt,
            generated_tokens=self.generated,
        )
