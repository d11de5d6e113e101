"""CPU-heavy request parsing (tokenizing a long prompt, rendering a long chat) off the router's event loop.

One request's parsing must never stall every other request: a 4 MB prompt took seconds to tokenize on the
event loop. Parsing that could take more than about a millisecond runs on threads instead (the tokenizer
releases the GIL while it encodes, so the event loop keeps serving meanwhile), in two lanes:

- ``large`` jobs (huge prompts, chats or token lists) on ``max_workers`` threads, with at most ``max_waiting``
  more queued: past that the request is refused with RESOURCE_EXHAUSTED and a retry hint, so a flood of huge
  prompts holds no unbounded memory;
- the others (a few KiB to a few hundred KiB: ordinary long prompts) on threads of their own, never refused
  and never queued behind a huge one.
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
        self.num_jobs = 0  # large jobs running + waiting
        self.num_refused = 0
        self._large = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="router-parse-large")
        self._medium = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="router-parse")

    async def run(self, fn: Callable[..., T], *args, large: bool = False) -> T:
        """``fn(*args)`` on a thread; a ``large`` job is AdmissionError (RESOURCE_EXHAUSTED) when its lane is full."""
        loop = asyncio.get_running_loop()
        if not large:
            return await loop.run_in_executor(self._medium, fn, *args)
        if self.num_jobs >= self.max_jobs:
            self.num_refused += 1
            raise AdmissionError(f"router: {self.num_jobs} huge requests are being parsed already", RETRY_AFTER_S)
        self.num_jobs += 1
        try:
            return await loop.run_in_executor(self._large, fn, *args)
        finally:
            self.num_jobs -= 1

    def close(self) -> None:
        for pool in (self._large, self._medium):
            pool.shutdown(wait=False, cancel_futures=True)
