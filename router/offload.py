"""CPU-heavy request parsing (tokenizing a long prompt, rendering a long chat) off the router's event loop.

One request's parsing must never stall every other request: a 4 MB prompt takes seconds to tokenize. Work that
is large enough to matter runs on a small thread pool (the tokenizer's batch call releases the GIL, so the
event loop keeps serving meanwhile); at most ``max_workers`` jobs run at once and ``max_waiting`` more wait.
Past that the request is refused with RESOURCE_EXHAUSTED and a retry hint, so a flood of huge prompts queues
no unbounded memory and delays no small request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from pdserve.router.admission import AdmissionError

T = TypeVar("T")
RETRY_AFTER_S = 0.5


class Offload:
    def __init__(self, max_workers: int = 2, max_waiting: int = 8):
        if max_workers < 1 or max_waiting < 0:
            raise ValueError("offload: max_workers must be >= 1 and max_waiting >= 0")
        self.max_jobs = max_workers + max_waiting
        self.num_jobs = 0  # running + waiting
        self.num_refused = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="router-parse")

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the pool; AdmissionError (RESOURCE_EXHAUSTED) when the pool and its queue are full."""
        if self.num_jobs >= self.max_jobs:
            self.num_refused += 1
            raise AdmissionError(f"router: {self.num_jobs} large prompts are being tokenized already", RETRY_AFTER_S)
        self.num_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.num_jobs -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
