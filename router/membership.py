"""Worker membership: static lists, load polling, health, drain state."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.rpc import channel

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


@dataclass(slots=True)
class Worker:
    address: str
    role: str
    channel: grpc.aio.Channel
    stub: object
    load: pb.WorkerLoad = field(default_factory=pb.WorkerLoad)
    healthy: bool = False
    draining: bool = False
    in_flight: int = 0
    consecutive_failures: int = 0
    last_seen: float = 0.0

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining and not self.load.draining

    def status(self) -> pb.WorkerStatus:
        return pb.WorkerStatus(
            address=self.address,
            role=self.role,
            healthy=self.healthy,
            draining=self.draining or self.load.draining,
            load=self.load,
            in_flight=self.in_flight,
        )


class Membership:
    def __init__(self, poll_interval_s: float = 0.5, failure_threshold: int = 2):
        self.workers: dict[str, Worker] = {}
        self.poll_interval_s = poll_interval_s
        self.failure_threshold = failure_threshold
        self._task: asyncio.Task | None = None

    def add(self, address: str, role: str) -> Worker:
        if role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
        if address in self.workers:
            return self.workers[address]
        ch = channel(address)
        stub = pb_grpc.PrefillStub(ch) if role == "prefill" else pb_grpc.DecodeStub(ch)
        worker = Worker(address, role, ch, stub)
        self.workers[address] = worker
        logger.info("added %s worker %s", role, address)
        return worker

    async def remove(self, address: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is not None:
            await worker.channel.close()

    def pool(self, role: str, available_only: bool = True) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role and (w.available or not available_only)]

    def get(self, address: str) -> Worker:
        try:
            return self.workers[address]
        except KeyError:
            raise KeyError(f"address: no worker {address!r}") from None

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))

    async def _poll(self, worker: Worker) -> None:
        try:
            worker.load = await worker.stub.GetLoad(pb.LoadRequest(), timeout=max(1.0, self.poll_interval_s * 2))
            if not worker.healthy:
                logger.info("%s worker %s is healthy", worker.role, worker.address)
            worker.healthy = True
            worker.consecutive_failures = 0
            worker.last_seen = time.monotonic()
        except grpc.aio.AioRpcError as e:
            worker.consecutive_failures += 1
            if worker.healthy and worker.consecutive_failures >= self.failure_threshold:
                logger.warning("%s worker %s is unhealthy: %s", worker.role, worker.address, e.code().name)
                worker.healthy = False

    def mark_failed(self, worker: Worker) -> None:
        """A request saw this worker fail: stop routing to it until a poll succeeds."""
        worker.healthy = False
        worker.consecutive_failures = max(worker.consecutive_failures, self.failure_threshold)

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(w.healthy for w in self.workers.values()):
                return True
            await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for w in list(self.workers.values()):
            await w.channel.close()
