"""Admin.LoadAdapter / UnloadAdapter: one call fanned out to every prefill and decode worker of a base-model pool.

Load: every worker of the pool loads the adapter (engine thread, between steps); it becomes servable once they
all have (a worker that fails rolls the others back, and the call fails with that worker's status). Unload:
the adapter is hidden at once (new requests for it get NOT_FOUND), the requests already running under it here
finish (up to ``drain_s``), then every worker of the pool unloads it. No request is lost on either path.

A worker that joins the pool later (a restart, a scale-up) lacks the adapters loaded through the API; a
background task loads them on it (``reconcile``, every ``interval_s``; a failure is retried after ``retry_s``).
Until it has them, routing leaves it out for those adapters (router.failover.holding). Routers are stateless
here: each load gets a version, the workers report what was loaded through the API and which versions were
unloaded since (serving.adapter_records), and ``reconcile`` works from those reports as well as from its own
loads, so a restarted router, or another replica, catches new workers up too. A version unloaded anywhere is
never loaded again, by any router (the workers refuse it as well).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from pdserve.engine.errors import InvalidRequestError, RequestNotFoundError, UnavailableError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.membership import Membership, Worker
from pdserve.router.models import ModelCatalog
from pdserve.serving.errors import RpcStatusError
from pdserve.serving.model_names import check_name

logger = logging.getLogger(__name__)


class AdapterAdmin:
    def __init__(self, membership: Membership, catalog: ModelCatalog, timeout_s: float = 60.0, drain_s: float = 120.0,
                 interval_s: float = 1.0, retry_s: float = 30.0, on_change=lambda name: None):
        self.membership = membership
        self.on_change = on_change  # (adapter name): its weights changed or went; cached answers must go too
        self.catalog = catalog
        self.timeout_s = timeout_s
        self.drain_s = drain_s
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.loaded: dict[str, tuple[str, str, str]] = {}  # loaded through this router -> (base, path, version)
        self._retry_at: dict[tuple[str, str], float] = {}  # (worker address, adapter) whose load failed -> when next
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one load/unload/reconcile at a time

    async def _call(self, worker: Worker, method: str, request) -> object:
        rpc = getattr(worker.stub, method)
        return await rpc(request, timeout=self.timeout_s, metadata=self.membership.metadata(worker.role, method))

    async def load(self, name: str, path: str, base_model: str = "") -> list[str]:
        """Load ``name`` from ``path`` on every worker of ``base_model``'s pool; -> their worker ids."""
        check_name(name, "name")
        if not path:
            raise InvalidRequestError("path: must name a PEFT adapter directory on the workers")
        base = base_model or self.catalog.default
        if base not in self.catalog.bases:
            raise RequestNotFoundError(f"base_model: {base[:200]!r} is not served here")
        if name in self.catalog.bases or name in self.catalog.routes:
            raise InvalidRequestError(f"name: {name!r} is already a base model or a route")
        other = self.catalog.adapter_base(name)
        if other is not None and other != base:
            raise InvalidRequestError(f"name: adapter {name!r} is already loaded for base model {other!r}")
        async with self._lock:
            workers = [w for w in self.catalog.pool_workers(base) if w.healthy]
            if not workers:
                raise UnavailableError(f"base_model: no healthy worker serves {base!r}")
            self.catalog.loading.add(name)
            version = uuid.uuid4().hex
            request = pb.LoadAdapterRequest(name=name, path=path, version=version)
            try:
                results = await asyncio.gather(*(self._call(w, "LoadAdapter", request) for w in workers),
                                               return_exceptions=True)
                failed = [(w, r) for w, r in zip(workers, results, strict=True) if isinstance(r, BaseException)]
                if failed:
                    done = [w for w, r in zip(workers, results, strict=True) if not isinstance(r, BaseException)]
                    await self._unload_on(done, name, version)  # all or nothing: no half-loaded adapter
                    raise _failure(*failed[0], f"loading adapter {name!r}")
                self.on_change(name)  # answers of an adapter loaded before under this name are stale
                self.catalog.hidden.discard(name)
                self.loaded[name] = (base, path, version)
                await asyncio.gather(*(self.membership.poll(w) for w in workers))
            finally:
                self.catalog.loading.discard(name)
        self.start()
        logger.info("adapter %s loaded from %s on %d workers of %s", name, path, len(workers), base)
        return [w.load.worker_id or w.address for w in workers]

    async def unload(self, name: str) -> tuple[bool, list[str]]:
        """Hide ``name``, let its running requests finish, then unload it everywhere; -> (was loaded, worker ids)."""
        async with self._lock:
            holders = [w for w in self.membership.workers.values() if name in w.load.adapters]
            base = self.catalog.adapter_base(name)
            if not holders and base is None:
                kind = "base model" if name in self.catalog.bases else "route" if name in self.catalog.routes else ""
                if kind:
                    raise InvalidRequestError(f"name: {name[:200]!r} is a {kind}, not an adapter")
                raise RequestNotFoundError(f"name: no adapter {name[:200]!r} is loaded")
            base = base or next(
                (b for b in map(self.catalog.base_of, holders) if b is not None), self.catalog.default)
            self.catalog.hidden.add(name)  # from now on new requests for it are NOT_FOUND
            version = (self.loaded.pop(name, None) or ("", "", ""))[2] or self._learned(base).get(name, ("", ""))[1]
            await self._drain(name)
            workers = list({w.address: w for w in [*self.catalog.pool_workers(base), *holders]}.values())
            dropped = await self._unload_on(workers, name, version)
            self.on_change(name)
            await asyncio.gather(*(self.membership.poll(w) for w in workers))
        logger.info("adapter %s unloaded from %d workers", name, len(dropped))
        return bool(dropped) or bool(holders), dropped

    def _learned(self, base: str) -> dict[str, tuple[str, str]]:
        """Adapters the workers of ``base``'s pool report as loaded through the API (by any router), minus the
        versions any of them reports unloaded: name -> (path, version)."""
        live, dead = {}, set()
        for w in self.catalog.pool_workers(base):
            for r in w.load.api_adapters:
                if r.unloaded:
                    dead.add((r.name, r.version))
                else:
                    live.setdefault(r.name, (r.path, r.version))
        return {n: pv for n, pv in live.items() if (n, pv[1]) not in dead}

    def _wanted(self) -> list[tuple[str, str, str, str]]:
        """(name, base, path, version) of every adapter some pool should hold everywhere."""
        wanted = {name: (base, path, version) for name, (base, path, version) in self.loaded.items()}
        for base in self.catalog.bases:
            for name, (path, version) in self._learned(base).items():
                if name not in wanted and name not in self.catalog.hidden and name not in self.catalog.bases \
                        and name not in self.catalog.routes:
                    wanted[name] = (base, path, version)
        return [(name, *v) for name, v in wanted.items()]

    async def reconcile(self) -> list[str]:
        """Load every adapter loaded through the API (this router's loads and those the workers report) on
        the healthy workers of its pool that lack it; -> the "adapter@address" pairs loaded."""
        done = []
        async with self._lock:
            now = time.monotonic()
            for name, base, path, version in self._wanted():
                for w in self.catalog.pool_workers(base):
                    key = (w.address, name)
                    if not w.healthy or name in w.load.adapters or self._retry_at.get(key, 0.0) > now:
                        continue
                    try:
                        await self._call(w, "LoadAdapter", pb.LoadAdapterRequest(name=name, path=path, version=version))
                    except grpc.aio.AioRpcError as e:
                        self._retry_at[key] = now + self.retry_s
                        logger.warning("adapter %s: cannot load it on %s worker %s (retry in %.0fs): %s", name,
                                       w.role, w.address, self.retry_s, e.details())
                        continue
                    self._retry_at.pop(key, None)
                    await self.membership.poll(w)
                    done.append(f"{name}@{w.address}")
                    logger.info("adapter %s loaded on %s worker %s, which lacked it", name, w.role, w.address)
        return done

    def start(self) -> None:
        """Catch joining workers up from now on (the router starts it: the workers may report API loads)."""
        if self._task is None:
            self._task = asyncio.create_task(self._reconcile_forever())

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - one bad round must not end the catch-up for good
                logger.exception("adapter reconcile round failed")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _drain(self, name: str) -> None:
        """Wait (up to ``drain_s``) for the requests running under ``name`` through this router to finish."""
        running = self.catalog.running
        deadline = time.monotonic() + self.drain_s
        while running.get(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if running.get(name):
            logger.warning("unloading adapter %s with %d requests still running", name, running[name])

    async def _unload_on(self, workers: list[Worker], name: str, version: str = "") -> list[str]:
        request = pb.UnloadAdapterRequest(name=name, version=version)
        results = await asyncio.gather(*(self._call(w, "UnloadAdapter", request) for w in workers),
                                       return_exceptions=True)
        dropped = []
        for w, r in zip(workers, results, strict=True):
            if isinstance(r, BaseException):
                logger.warning("unloading adapter %s on %s %s failed: %s", name, w.role, w.address, r)
            elif r.unloaded:
                dropped.append(w.load.worker_id or w.address)
        return dropped


def _failure(worker: Worker, error: BaseException, what: str) -> Exception:
    """A worker's failure as the admin call's: its status, the worker named."""
    if isinstance(error, grpc.aio.AioRpcError):
        return RpcStatusError(error.code(), f"{what} on {worker.role} worker {worker.address}: {error.details()}")
    return UnavailableError(f"{what} on {worker.role} worker {worker.address}: {error}")
