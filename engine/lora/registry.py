"""The engine's adapters by name: load (or replace), unload, resolve for a request.

Adapters live on the host here; engine.lora.slots keeps up to ``max_loras`` of them on the device. Unloading or
replacing an adapter retires the old one: requests already running on it keep a reference and finish on its
weights, but compute nothing that is cached (engine.scheduler), and every prefix-cache block hashed under its
name is dropped at once (``BlockPool.drop_tagged``, reported as evictions in the KV events), so a reload under
the same name never reuses KV computed with the old weights.
"""

from __future__ import annotations

import logging
import time

from pdserve.engine.errors import AdapterNotFoundError
from pdserve.engine.lora.adapter import LoRAAdapter, load_adapter
from pdserve.engine.lora.slots import LoRASlots

logger = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(self, slots: LoRASlots | None, pool, max_rank: int):
        self.slots = slots  # None: LoRA is not enabled on this engine
        self.pool = pool
        self.max_rank = max_rank
        self.adapters: dict[str, LoRAAdapter] = {}
        self.last_load_s = 0.0

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def load(self, name: str, path: str) -> None:
        self.install(self.read(name, path))

    def read(self, name: str, path: str) -> LoRAAdapter:
        """Read and validate an adapter's files. Touches no engine state, so any thread may run it (a worker
        reads off the engine thread and then ``install``s there, so a large adapter does not stall steps)."""
        if self.slots is None:
            raise ValueError("enable_lora: this engine was started without LoRA support")
        if not isinstance(name, str) or not name or not name.strip() or len(name) > 256:
            raise ValueError(f"name: adapter names must be non-empty strings of at most 256 characters, got {name!r}")
        if not isinstance(path, str) or not path:
            raise ValueError(f"path: must be a PEFT adapter directory, got {path!r}")
        t0 = time.perf_counter()
        adapter = load_adapter(name, path, self.slots.dims, self.max_rank, self.slots.dtype)
        self.last_load_s = time.perf_counter() - t0
        return adapter

    def install(self, adapter: LoRAAdapter) -> None:
        """Register a read adapter under its name (replacing one of that name). Engine thread only."""
        name = adapter.name
        old = self.adapters.get(name)
        if old is not None:
            self._retire(old)
        self.adapters[name] = adapter
        logger.info("lora: loaded adapter %r (rank %d, %d tensors) from %s in %.3fs%s", name, adapter.rank,
                    2 * len(adapter.weights), adapter.path, self.last_load_s, " (replaced)" if old else "")

    def unload(self, name: str) -> bool:
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            return False
        self._retire(adapter)
        logger.info("lora: unloaded adapter %r", name)
        return True

    def resolve(self, name: str | None) -> LoRAAdapter | None:
        """The adapter a request names (None: the base model); AdapterNotFoundError naming it if unknown."""
        if not name:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            if self.slots is None:
                raise AdapterNotFoundError(f"lora_name: adapter {name!r} not found (LoRA is not enabled)")
            raise AdapterNotFoundError(f"lora_name: adapter {name!r} is not loaded")
        return adapter

    def _retire(self, adapter: LoRAAdapter) -> None:
        adapter.retired = True
        self.slots.evict(adapter)  # its slot is free at once; a request still on it swaps it back in
        dropped = self.pool.drop_tagged(adapter.name)
        if dropped:
            logger.info("lora: dropped %d cached blocks of adapter %r", dropped, adapter.name)
