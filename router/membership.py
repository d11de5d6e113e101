"""Worker membership: static lists, load polling, health, drain state."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field

import grpc

from pdserve.engine.layout import LayoutFingerprint
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.router.edge import load_from_proto
from pdserve.router.load import WorkerLoad
from pdserve.serving.cluster_auth import ClusterCredential, method_name
from pdserve.serving.rpc import channel

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
REMOVED_CLOSE_GRACE_S = 30.0  # a removed worker's channel: calls in flight may finish this long (a worker's drain)


@dataclass(slots=True)
class Worker:
    address: str
    role: str
    channel: grpc.aio.Channel
    stub: object
    load: WorkerLoad = field(default_factory=WorkerLoad)
    healthy: bool = False
    draining: bool = False
    in_flight: int = 0
    consecutive_failures: int = 0
    last_seen: float = 0.0
    open_until: float = 0.0  # circuit breaker: no traffic before this time
    registered_ttl_s: float = 0.0  # > 0: dynamic member, dropped when heartbeats stop
    static: bool = False  # from --prefill/--decode/--config: listed for good, whether or not it also registers
    heartbeat: float = 0.0
    in_flight_at_poll: int = 0  # ``in_flight`` when ``load`` was polled (fresh load: see ``num_seqs``)
    calls: set = field(default_factory=set)  # this router's Decode calls that depend on it (router.leg)
    hung: bool = False  # its health polls time out: alive (its connection is up) but not answering

    @property
    def num_seqs(self) -> int:
        """Sequences on the worker now, as best known: the last poll's running + waiting, plus the net change in
        this router's own in-flight requests since (those started, minus those ended). Right after a burst the
        poll still shows the burst; this shows it gone as soon as its requests have ended here."""
        return max(0, self.load.num_running + self.load.num_waiting + self.in_flight - self.in_flight_at_poll)

    def layout(self) -> LayoutFingerprint | None:
        """The worker's KV layout fingerprint, or None if it has not reported a usable one."""
        return self.load.fingerprint

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining and not self.load.draining and time.monotonic() >= self.open_until

    @property
    def circuit_open(self) -> bool:
        return time.monotonic() < self.open_until


def cancel_calls_of_hung(worker: Worker) -> None:
    """A worker that stopped answering (stopped, wedged, swapping): its connection stays up, so the requests on it
    would wait to their deadlines. Their calls are cancelled, which the decode leg turns into a migration to another
    worker (router.leg); the worker, when it wakes, sees the cancels and frees their blocks."""
    worker.hung = True
    if worker.calls:
        logger.warning("%s worker %s stopped answering; moving its %d requests", worker.role, worker.address,
                       len(worker.calls))
    for call in list(worker.calls):
        call.cancel()


class Membership:
    def __init__(self, poll_interval_s: float = 0.5, failure_threshold: int = 2, on_change=None, tls=None,
                 dns: list[tuple[str, str]] | None = None, credential: ClusterCredential | None = None):
        self.tls = tls
        self.credential = credential  # the cluster token every call to a worker carries (None: no cluster secret)
        self.dns = list(dns or [])  # (role, "host:port"): headless-Service discovery, re-resolved every poll
        self.dns_members: set[str] = set()
        self.workers: dict[str, Worker] = {}
        self.poll_interval_s = poll_interval_s
        self.failure_threshold = failure_threshold
        self.on_change = on_change  # called with (worker, added: bool)
        self.model_of = lambda w: w.load.served_model  # the base model a worker is pooled under (router.models)
        self._task: asyncio.Task | None = None
        self._polls: dict[str, asyncio.Task] = {}  # address -> its outstanding or last poll (_run)
        self._closing: dict[asyncio.Task, grpc.aio.Channel] = {}  # removed workers' channels, closing with grace

    def add(self, address: str, role: str, static: bool = False) -> Worker:
        if role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
        if address in self.workers:
            worker = self.workers[address]
            if static:
                worker.static, worker.registered_ttl_s = True, 0.0
            return worker
        ch = channel(address, self.tls)
        stub = pb_grpc.PrefillStub(ch) if role == "prefill" else pb_grpc.DecodeStub(ch)
        worker = Worker(address, role, ch, stub, static=static)
        self.workers[address] = worker
        logger.info("added %s worker %s", role, address)
        if self.on_change:
            self.on_change(worker, True)
        return worker

    def register(self, address: str, role: str, ttl_s: float) -> Worker:
        """A heartbeat from a self-registering worker."""
        if not address or ":" not in address:
            raise ValueError(f"address: expected host:port, got {address!r}")
        existing = self.workers.get(address)
        if existing is not None and existing.role != role:
            raise ValueError(f"role: {address} is registered as {existing.role}, not {role}")
        worker = existing or self.add(address, role)
        if not worker.static:  # a static member is polled for good: its heartbeats never make it expire
            worker.registered_ttl_s = max(ttl_s, self.poll_interval_s * 2)
        worker.heartbeat = time.monotonic()
        return worker

    async def leave(self, address: str) -> None:
        """A worker's goodbye (it is stopping): a registered member is removed at once; a static one stays listed,
        out of traffic until a poll finds it serving again (a restart on the same address)."""
        worker = self.workers.get(address)
        if worker is None or not worker.static:
            await self.remove(address)
            return
        worker.healthy = False
        logger.info("static %s worker %s is stopping; polling it until it is back", worker.role, address)

    async def remove(self, address: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is not None:
            logger.info("removed %s worker %s", worker.role, address)
            if self.on_change:
                self.on_change(worker, False)
            # calls in flight finish first (a draining worker completes them): closing at once would cancel them
            task = asyncio.get_running_loop().create_task(worker.channel.close(grace=REMOVED_CLOSE_GRACE_S))
            self._closing[task] = worker.channel
            task.add_done_callback(lambda t: self._closing.pop(t, None))

    async def expire(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.registered_ttl_s and now - w.heartbeat > w.registered_ttl_s:
                logger.warning("%s worker %s stopped heartbeating; removing it", w.role, w.address)
                await self.remove(w.address)

    def max_model_len(self, model: str | None = None) -> int:
        """The longest context a decode worker (of ``model``'s pool) serves (0 until one has reported it). Workers
        whose circuit is open count too: a request too long for the model is invalid whether or not its workers
        are up at this moment, and must get INVALID_ARGUMENT, not UNAVAILABLE (which a client would retry)."""
        return max((w.load.max_model_len for w in self.pool("decode", available_only=False, model=model)), default=0)

    def pool(self, role: str, available_only: bool = True, model: str | None = None) -> list[Worker]:
        """The ``role`` workers (of base model ``model``'s pool when given; see ``model_of``)."""
        return [w for w in self.workers.values() if w.role == role and (w.available or not available_only)
                and (model is None or self.model_of(w) == model)]

    async def poll(self, worker: Worker) -> None:
        """Refresh one worker's load now (e.g. after its adapters changed)."""
        await self._poll(worker)

    def get(self, address: str) -> Worker:
        try:
            return self.workers[address]
        except KeyError:
            raise KeyError(f"address: no worker {address[:200]!r}") from None

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))

    def metadata(self, role: str, method: str, binding: str = ""):
        """Call metadata for ``method`` of a ``role`` worker: its cluster token, or None without a secret."""
        if self.credential is None:
            return None
        return self.credential.metadata(method_name(role.capitalize(), method), binding)

    async def _poll(self, worker: Worker) -> None:
        try:
            msg = await worker.stub.GetLoad(pb.LoadRequest(), timeout=max(2.0, self.poll_interval_s * 4),
                                            metadata=self.metadata(worker.role, "GetLoad"))
            worker.load = load_from_proto(msg)
            worker.in_flight_at_poll = worker.in_flight
            if not worker.healthy:
                logger.info("%s worker %s is healthy", worker.role, worker.address)
            worker.hung = False
            if time.monotonic() >= worker.open_until:
                worker.healthy = True
                worker.consecutive_failures = 0
            worker.last_seen = time.monotonic()
        except grpc.aio.AioRpcError as e:
            worker.consecutive_failures += 1
            if e.code() == grpc.StatusCode.UNAUTHENTICATED and worker.consecutive_failures == 1:
                logger.warning("%s worker %s refused this router's cluster credential (is PDSERVE_CLUSTER_SECRET "
                               "the same on both?): %s", worker.role, worker.address, e.details())
            if worker.healthy and worker.consecutive_failures >= self.failure_threshold:
                logger.warning("%s worker %s is unhealthy: %s", worker.role, worker.address, e.code().name)
                worker.healthy = False
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    cancel_calls_of_hung(worker)

    def mark_failed(self, worker: Worker) -> None:
        """Circuit breaker: a request saw this worker fail. Open the circuit with exponential backoff
        (0.5 s, 1 s, 2 s ... up to 30 s); it closes on the first successful poll after that."""
        worker.healthy = False
        worker.consecutive_failures = max(worker.consecutive_failures + 1, self.failure_threshold)
        backoff = min(30.0, 0.5 * 2 ** (worker.consecutive_failures - self.failure_threshold))
        worker.open_until = time.monotonic() + backoff
        logger.warning("%s worker %s failed a request; circuit open for %.1fs", worker.role, worker.address, backoff)

    async def discover(self) -> None:
        """Resolve every DNS source (e.g. a Kubernetes headless Service); add new pods, drop vanished ones."""
        if not self.dns:
            return
        loop = asyncio.get_running_loop()
        seen: set[str] = set()
        for role, target in self.dns:
            host, _, port = target.rpartition(":")
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except (OSError, ValueError) as e:
                logger.warning("cannot resolve %s workers at %s: %s", role, target, e)
                return  # keep the current members rather than dropping them on a DNS hiccup
            for info in infos:
                ip = info[4][0]
                addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                seen.add(addr)
                if addr not in self.workers:
                    self.add(addr, role)
                    self.dns_members.add(addr)
        for addr in list(self.dns_members - seen):
            self.dns_members.discard(addr)
            await self.remove(addr)

    async def _run(self) -> None:
        """Every ``poll_interval_s``: discover, expire, and poll each worker that has no poll outstanding. A poll
        is waited for at most one interval, so a hung worker (its GetLoad runs to its timeout) does not hold up
        the others' load figures or their health; its poll goes on alone."""
        while True:
            await self.discover()
            await self.expire()
            for address, worker in list(self.workers.items()):
                task = self._polls.get(address)
                if task is None or task.done():
                    self._polls[address] = asyncio.create_task(self._poll(worker))
            for address in [a for a, t in self._polls.items() if t.done() and a not in self.workers]:
                del self._polls[address]
            outstanding = [t for t in self._polls.values() if not t.done()]
            if outstanding:
                await asyncio.wait(outstanding, timeout=self.poll_interval_s)
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
        for task in self._polls.values():
            task.cancel()
        for w in list(self.workers.values()):
            await w.channel.close()
        for ch in list(self._closing.values()):  # removed workers' calls are not waited for at shutdown
            await ch.close()
