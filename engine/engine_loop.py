"""One thread owns the engine; services reach it through a command queue.

``call(fn)`` runs ``fn(engine)`` on the engine thread between steps and returns a future. Step outputs are
delivered to per-request listeners (on the engine thread; asyncio users hop back with
``loop.call_soon_threadsafe``). A failing step fails only the requests in that batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from pdserve.engine.engine import LLMEngine, StepOutput
from pdserve.engine.errors import CancelledError
from pdserve.engine.kv_event_hub import KVEventHub
from pdserve.engine.stats import LoadStats, TokenTotals

logger = logging.getLogger(__name__)
T = TypeVar("T")
Listener = Callable[[StepOutput | BaseException], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine, name: str = "engine", step_delay_s: float = 0.0):
        self.engine = engine
        self.step_delay_s = step_delay_s  # fault injection / tests: slow every step down
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[str, Listener] = {}
        self._ended: set[str] = set()  # requests whose last output the current step delivered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.stats = LoadStats(
            num_total_blocks=engine.pool.num_blocks, num_free_blocks=engine.pool.num_free_blocks
        )
        self._totals = TokenTotals()
        self._events = KVEventHub(engine)
        self.last_abort_latency_s = 0.0
        self.num_aborted = 0  # aborts that freed a request, counted on the engine thread as its blocks come free
        self.on_step: Callable[[float], None] | None = None  # e.g. a metrics histogram

    def start(self) -> EngineLoop:
        self._thread.start()
        threading.Thread(target=self.engine.grammars.warm_up, name=f"{self._thread.name}-grammars",
                         daemon=True).start()  # the first structured-outputs request must not stall the loop
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        self._thread.join(timeout)

    # ---- API for services (any thread) ------------------------------------------------------------
    def call(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._cmds.put((fn, fut))
        return fut

    async def acall(self, fn: Callable[[LLMEngine], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    def listen(self, request_id: str, listener: Listener) -> None:
        """Register before adding the request (from the engine thread, inside a ``call``)."""
        self._listeners[request_id] = listener

    async def stream(self, request_id: str, add: Callable[[LLMEngine], object]) -> AsyncIterator[StepOutput]:
        """Add a request with ``add(engine)`` and yield its outputs until it finishes.

        If ``add`` returns a StepOutput (a prefilled request's first token), it is yielded first.

        If the consumer stops early (cancel, deadline), the request is aborted and its blocks freed.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def deliver(item: StepOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                pass

        def start(engine: LLMEngine) -> object:
            before = self._listeners.get(request_id)
            self._listeners[request_id] = deliver
            try:
                return add(engine)
            except BaseException:
                # refused (e.g. the id is in use): the request that has the id keeps its listener
                if before is None:
                    self._listeners.pop(request_id, None)
                else:
                    self._listeners[request_id] = before
                raise

        initial = await self.acall(start)
        finished = False
        try:
            if isinstance(initial, StepOutput):
                finished = initial.finished
                yield initial
                if finished:
                    return
            while True:
                item = await q.get()
                # adaptive coalescing: when the consumer falls behind, send what piled up as one output
                while not isinstance(item, BaseException) and not item.finished and not q.empty():
                    nxt = q.get_nowait()
                    if isinstance(nxt, BaseException):
                        item = nxt
                        break
                    item = merge_outputs(item, nxt)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id, time.monotonic())

    async def kv_events(self) -> AsyncIterator[tuple[bool, list]]:
        """Yield (is_snapshot, events): first a snapshot of every cached block hash, then deltas in order."""
        async for item in self._events.stream(self):
            yield item

    def _abort(self, engine: LLMEngine, request_id: str) -> bool:
        listener = self._listeners.pop(request_id, None)
        freed = engine.abort(request_id)
        if listener is not None:  # its stream ends with a status instead of waiting for outputs that never come
            listener(CancelledError(f"request {request_id} was aborted"))
        return freed

    def abort(self, request_id: str, since: float | None = None) -> concurrent.futures.Future[bool]:
        """Abort from any thread; records how long the blocks took to come free (cancel latency). A stream still
        reading the request ends with ``CancelledError``."""

        def run(engine: LLMEngine) -> bool:
            freed = self._abort(engine, request_id)
            if freed:
                self.num_aborted += 1
                if since is not None:
                    self.last_abort_latency_s = time.monotonic() - since
            return freed

        return self.call(run)

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            idle = not self.engine.has_unfinished()
            try:
                cmd = self._cmds.get(timeout=0.05) if idle else self._cmds.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                fn, fut = cmd
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.engine))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
                if self._stop.is_set():
                    return
            if self.engine.has_unfinished():
                self._step()
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
            self._events.flush()
            self._publish_stats()

    def _step(self) -> None:
        # a failing step fails the requests it ran and those whose last output it had still to make, but not one
        # whose last output it made before failing (async output): that request ended well, and a prefill-only
        # one's held blocks are still being read by its transfer (aborting it would release them under it)
        running = [s.request_id for s in self.engine.scheduler.running] + self.engine.unemitted_ids()
        self._ended.clear()
        t0 = time.perf_counter()
        try:
            steps = self.engine.num_steps
            self.engine.step(emit=self._deliver)  # outputs go out as soon as they are made (during the next forward)
            if self.on_step is not None and self.engine.num_steps > steps:  # not a call that only made outputs
                self.on_step(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            running = [rid for rid in running if rid not in self._ended]
            logger.exception("engine step failed; failing %d requests", len(running))
            for rid in running:
                self.engine.abort(rid)
                listener = self._listeners.pop(rid, None)
                if listener:
                    listener(e)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            self._totals.generated += len(out.new_token_ids)
            listener = self._listeners.get(out.request_id)
            if out.finished:
                self._ended.add(out.request_id)
                self._listeners.pop(out.request_id, None)
                self._totals.prompt += out.num_prompt_tokens
                self._totals.hit += out.num_cached_tokens
            if listener:
                listener(out)

    def _publish_stats(self) -> None:
        self.stats = self._totals.snapshot(self.engine)


def merge_outputs(a: StepOutput, b: StepOutput) -> StepOutput:
    """Two consecutive outputs of one request as one."""
    return StepOutput(
        a.request_id,
        a.new_token_ids + b.new_token_ids,
        a.text_delta + b.text_delta,
        b.finished,
        b.finish_reason,
        a.logprobs + b.logprobs,
        b.num_prompt_tokens,
        b.num_cached_tokens,
        b.stop_reason,
        a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
    )
