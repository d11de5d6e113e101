"""Fan-out of the block pool's KV events (stored / evicted / cleared) to subscribers, with a snapshot first.

Owned by the engine loop: ``flush`` and (un)subscription run on the engine thread, so a subscriber sees a
snapshot of every cached block hash and then every later delta, in order, with nothing lost in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable


class KVEventHub:
    def __init__(self, engine):
        self.engine = engine
        self._subs: list[Callable[[list], None]] = []

    def flush(self) -> None:
        """Engine thread: hand the pool's pending events to every subscriber."""
        events = self.engine.pool.drain_events()
        if events:
            for sub in self._subs:
                sub(events)

    async def stream(self, loop_owner) -> AsyncIterator[tuple[bool, list]]:
        """Yield (is_snapshot, events) through ``loop_owner.acall``/``call`` (the engine loop)."""
        aloop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def deliver(events: list) -> None:
            aloop.call_soon_threadsafe(q.put_nowait, events)

        def subscribe(engine) -> list[int]:
            self.flush()  # earlier events belong to the snapshot
            self._subs.append(deliver)
            return list(engine.pool.cached)

        snapshot = await loop_owner.acall(subscribe)
        try:
            yield True, snapshot
            while True:
                yield False, await q.get()
        finally:
            loop_owner.call(lambda e: self._subs.remove(deliver) if deliver in self._subs else None)
