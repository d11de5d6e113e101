"""Blocks held outside the scheduler, across a KV hand-off between workers.

- reservations (decode side): blocks reserved for a prompt whose KV another worker will write, until the
  request is handed over (``take_reservation``) or the reservation is cancelled;
- held (prefill side): the blocks of a finished prefill-only request, kept while a transfer may still be
  reading them, until ``release``.
"""

from __future__ import annotations

from collections.abc import Iterator

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.errors import CapacityError


class BlockHolds:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.reservations: dict[str, list[int]] = {}
        self.held: dict[str, list[int]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.reservations or request_id in self.held

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        need = self.blocks_for(num_tokens)
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

    def take_reservation(self, request_id: str) -> list[int]:
        """Hand the reserved blocks over to the request that now owns them."""
        return self.reservations.pop(request_id)

    def hold(self, request_id: str, block_ids: list[int]) -> None:
        self.held[request_id] = block_ids

    def release(self, request_id: str) -> bool:
        block_ids = self.held.pop(request_id, None)
        if block_ids is not None:
            self.pool.free(block_ids)
        return block_ids is not None

    def block_lists(self) -> Iterator[list[int]]:
        yield from self.reservations.values()
        yield from self.held.values()
