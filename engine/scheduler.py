"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first, in rank order, each getting up to the rest of the budget (a decode
takes one token, a prefill a chunk); then waiting sequences in the same order. The rank is the request
class with aging (engine.priority: higher priority first, then earlier arrival; a waiting request gains one
priority level per ``aging_s`` seconds, which bounds starvation). When blocks run out, the last-ranked
running sequence is preempted by recompute: its blocks are freed (the full ones stay in the prefix cache)
and it returns to the waiting queue keeping its place and every token it generated; it later recomputes
prompt + generated tokens (prefix hits make that cheap) and continues exactly where it stopped (seeded
sampling draws token i from (seed, i), engine.sampler). A waiting sequence of a strictly higher class that
also ranks ahead may preempt the last-ranked running one, for its blocks or for its batch slot
(``max_num_seqs``); one of equal or lower class waits. A decode-side reservation of a higher class may do
the same (``make_room``). Prefill-only sequences are never taken by a class (their KV is on its way out).
With LoRA, one step holds at most ``max_loras`` distinct adapters (the device slots); a sequence whose adapter
would need one more waits for a later step, keeping its place. Blocks are hashed with the adapter's name as the
extra key and tagged with it; a sequence on a retired (unloaded or replaced) adapter neither hits nor caches.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.hashing import block_hashes
from pdserve.engine.priority import DEFAULT_AGING_S, may_preempt, rank_key
from pdserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True if this step reaches the end of the sequence's known tokens (a token gets sampled)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        hash_seed: int = 0,
        aging_s: float = DEFAULT_AGING_S,
        max_loras: int = 0,
    ):
        self.pool = pool
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.hash_seed = hash_seed
        self.aging_s = aging_s  # seconds of waiting worth one priority level (0: no aging)
        self.waiting: list[tuple[tuple[float, int], Sequence]] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.max_loras = max_loras  # distinct adapters per step (0: no LoRA)

    # ---- queue management -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, (self._rank(seq), seq))

    def _rank(self, seq: Sequence) -> tuple[float, int]:
        return rank_key(seq, self.aging_s)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) from the queues; the caller frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting = [(k, s) for k, s in self.waiting if s is not seq]
            heapq.heapify(self.waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_queued_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for _, s in self.waiting) + sum(
            s.num_tokens - s.num_computed_tokens for s in self.running if s.in_prefill
        )

    # ---- blocks ---------------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def update_hashes(self, seq: Sequence) -> None:
        """Extend the sequence's hash chain and cache every full, computed block."""
        if len(seq.block_hashes) < seq.num_tokens // self.block_size:  # a block filled up since last time
            seq.block_hashes = block_hashes(
                seq.all_token_ids, self.block_size, self.hash_seed, seq.hash_extra, start=seq.block_hashes
            )
        if not self.pool.enable_prefix_caching or (seq.lora is not None and seq.lora.retired):
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes), len(seq.block_ids))
        hashed = self.pool.block_hash
        tag = seq.lora.name if seq.lora is not None else None
        for i in range(num_full):
            if hashed[seq.block_ids[i]] is None:  # cache_block does nothing for a block with a hash
                self.pool.cache_block(seq.block_ids[i], seq.block_hashes[i], tag)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _victim_for(self, seq: Sequence) -> Sequence | None:
        """The running sequence ``seq`` may preempt (engine.priority), if any: the last-ranked one (sequences
        admitted this step join the list unsorted). Prefill-only sequences are never taken: their KV is being
        pushed to another worker block by block, and they end after one prefill anyway."""
        candidates = [s for s in self.running if not s.prefill_only]
        if not candidates:
            return None
        victim = max(candidates, key=self._rank)
        return victim if may_preempt(seq, victim, self.aging_s) else None

    def make_room(self, num_blocks: int, priority: int) -> bool:
        """Preempt running sequences of a class below ``priority``, last-ranked first, until ``num_blocks`` are
        free (a reservation for a prompt another worker prefills). False if that is not enough; what was
        preempted stays preempted (it resumes by recompute)."""
        while not self.pool.can_allocate(num_blocks):
            lower = [s for s in self.running if s.priority < priority and not s.prefill_only]
            if not lower:
                return False
            self._preempt(max(lower, key=self._rank))
        return True

    def _preempt_scheduled(self, victim: Sequence, out: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], int]:
        """Preempt ``victim`` mid-schedule: drop it from this step; returns the step and its remaining budget."""
        out = [s for s in out if s.seq is not victim]
        self._preempt(victim)
        return out, self.max_num_batched_tokens - sum(s.num_new_tokens for s in out)

    def _prefix_hit(self, seq: Sequence) -> list[int]:
        """Cached blocks for a fresh sequence, capped so at least one token is computed."""
        seq.block_hashes = block_hashes(
            seq.all_token_ids, self.block_size, self.hash_seed, seq.hash_extra, start=seq.block_hashes
        )
        if seq.lora is not None and seq.lora.retired:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        return self.pool.find_cached_prefix(seq.block_hashes[:max_blocks])

    def _lora_fits(self, seq: Sequence, loras: set[int]) -> bool:
        """Whether ``seq``'s adapter fits this step's slots (``loras``: the adapters' uids taken so far)."""
        lora = seq.lora
        return lora is None or lora.uid in loras or len(loras) < self.max_loras

    # ---- the step -------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        self.running.sort(key=self._rank)
        loras: set[int] = set()
        deferred: list[tuple[tuple[float, int], Sequence]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if not self._lora_fits(seq, loras):
                i += 1  # its adapter would need one more slot than there are: a later step
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._blocks_for(seq.num_computed_tokens + n) - len(seq.block_ids)
            while need > 0 and not self.pool.can_allocate(need) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if need > 0 and not self.pool.can_allocate(need):
                self._preempt(seq)  # nothing left to take from: wait for blocks
                continue
            if need > 0:
                seq.block_ids += self.pool.allocate(need)
            out.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
            if seq.lora is not None:
                loras.add(seq.lora.uid)
        while self.waiting and budget > 0:
            seq = self.waiting[0][1]
            if not self._lora_fits(seq, loras):
                deferred.append(heapq.heappop(self.waiting))
                continue
            if len(self.running) >= self.max_num_seqs:  # no batch slot: only a higher class takes one
                victim = self._victim_for(seq)
                if victim is None:
                    break
                out, budget = self._preempt_scheduled(victim, out)
            hit: list[int] = []
            if seq.num_computed_tokens == 0 and not seq.block_ids and seq.params.prompt_logprobs is None:
                hit = self._prefix_hit(seq)  # (prompt logprobs need every position computed: no hits)
            computed = seq.num_computed_tokens or len(hit) * self.block_size
            n = min(seq.num_tokens - computed, budget)
            need = self._blocks_for(computed + n) - len(seq.block_ids) - len(hit)
            revived = sum(1 for b in hit if self.pool.ref_cnt[b] == 0)
            while not self.pool.can_allocate(need + revived) and (victim := self._victim_for(seq)) is not None:
                out, budget = self._preempt_scheduled(victim, out)
                # the victim may have shared some of the hit blocks: now free, touching them takes them
                revived = sum(1 for b in hit if self.pool.ref_cnt[b] == 0)
            if not self.pool.can_allocate(need + revived):
                break
            heapq.heappop(self.waiting)
            if hit:
                self.pool.touch(hit)
                seq.block_ids = hit
                seq.num_computed_tokens = computed
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = computed
            seq.block_ids += self.pool.allocate(need)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
            if seq.lora is not None:
                loras.add(seq.lora.uid)
        for entry in deferred:
            heapq.heappush(self.waiting, entry)
        return out
