"""Admin.LoadAdapter / UnloadAdapter: one call fanned out to every prefill and decode worker of a base-model pool.

Load: every worker of the pool loads the adapter (engine thread, between steps); it becomes servable once they
all have (a worker that fails rolls the others back, and the call fails with that worker's status). Unload:
the adapter is hidden at once (new requests for it get NOT_FOUND), the requests already running under it here
finish (up to ``drain_s``), then every worker of the pool unloads it. No request is lost on either path.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.engine.errors import InvalidRequestError, RequestNotFoundError, UnavailableError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.failover import Failover
from pdserve.router.membership import Membership, Worker
from pdserve.router.models import ModelCatalog
from pdserve.serving.errors import RpcStatusError
from pdserve.serving.model_names import check_name

logger = logging.getLogger(__name__)


class AdapterAdmin:
    def __init__(self, membership: Membership, catalog: ModelCatalog, failover: Failover | None = None,
                 timeout_s: float = 60.0, drain_s: float = 120.0):
        self.membership = membership
        self.catalog = catalog
        self.failover = failover  # its per-adapter count of running requests (None: nothing to wait for)
        self.timeout_s = timeout_s
        self.drain_s = drain_s
        self._lock = asyncio.Lock()  # one load/unload at a time

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
        other = self.catalog.adapters().get(name)
        if other is not None and other != base:
            raise InvalidRequestError(f"name: adapter {name!r} is already loaded for base model {other!r}")
        async with self._lock:
            workers = [w for w in self.catalog.pool_workers(base) if w.healthy]
            if not workers:
                raise UnavailableError(f"base_model: no healthy worker serves {base!r}")
            self.catalog.loading.add(name)
            try:
                results = await asyncio.gather(
                    *(self._call(w, "LoadAdapter", pb.LoadAdapterRequest(name=name, path=path)) for w in workers),
                    return_exceptions=True)
                failed = [(w, r) for w, r in zip(workers, results, strict=True) if isinstance(r, BaseException)]
                if failed:
                    done = [w for w, r in zip(workers, results, strict=True) if not isinstance(r, BaseException)]
                    await self._unload_on(done, name)  # all or nothing: no half-loaded adapter
                    raise _failure(*failed[0], f"loading adapter {name!r}")
                self.catalog.hidden.discard(name)
                await asyncio.gather(*(self.membership.poll(w) for w in workers))
            finally:
                self.catalog.loading.discard(name)
        logger.info("adapter %s loaded from %s on %d workers of %s", name, path, len(workers), base)
        return [w.load.worker_id or w.address for w in workers]

    async def unload(self, name: str) -> tuple[bool, list[str]]:
        """Hide ``name``, let its running requests finish, then unload it everywhere; -> (was loaded, worker ids)."""
        async with self._lock:
            holders = [w for w in self.membership.workers.values() if name in w.load.adapters]
            if not holders and name not in self.catalog.adapters():
                raise RequestNotFoundError(f"name: no adapter {name[:200]!r} is loaded")
            base = self.catalog.adapters().get(name) or next(
                (b for b in map(self.catalog.base_of, holders) if b is not None), self.catalog.default)
            self.catalog.hidden.add(name)  # from now on new requests for it are NOT_FOUND
            await self._drain(name)
            workers = list({w.address: w for w in [*self.catalog.pool_workers(base), *holders]}.values())
            dropped = await self._unload_on(workers, name)
            await asyncio.gather(*(self.membership.poll(w) for w in workers))
        logger.info("adapter %s unloaded from %d workers", name, len(dropped))
        return bool(dropped) or bool(holders), dropped

    async def _drain(self, name: str) -> None:
        """Wait (up to ``drain_s``) for the requests running under ``name`` through this router to finish."""
        if self.failover is None:
            return
        deadline = time.monotonic() + self.drain_s
        while self.failover.adapter_requests.get(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.failover.adapter_requests.get(name):
            logger.warning("unloading adapter %s with %d requests still running", name,
                           self.failover.adapter_requests[name])

    async def _unload_on(self, workers: list[Worker], name: str) -> list[str]:
        results = await asyncio.gather(
            *(self._call(w, "UnloadAdapter", pb.UnloadAdapterRequest(name=name)) for w in workers),
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
