"""The worker base prefill and decode share: identity, GetLoad, KVEvents, drain, registration, serve lifecycle.

A role servicer subclasses ``WorkerServicer`` and keeps only its role logic; the role's ``serve`` is
``worker_server(role, start)``, where ``start`` builds its engine (with its KV connector) and KV transfer end and
yields a factory for the servicer. ``run_worker`` owns the rest: the gRPC server with health, the engine thread, metrics, the ready line, registration with routers
and, on SIGTERM (or ``stop``), goodbye -> NOT_SERVING -> drain in-flight work within the grace -> stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import grpc

from pdserve.engine.errors import CapacityError, InvalidRequestError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.adapter_records import AdapterRecords
from pdserve.serving.cluster_auth import ClusterAuthInterceptor, ClusterCredential
from pdserve.serving.convert import integrity, kv_event_stream, load_to_proto
from pdserve.serving.errors import abort_with
from pdserve.serving.model_names import check_name
from pdserve.serving.observability import serve_metrics
from pdserve.serving.rpc import TlsConfig, create_server, heartbeat, install_sigterm, set_serving
from pdserve.serving.worker_metrics import STEP_SECONDS, WorkerCollector

if TYPE_CHECKING:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.engine_loop import EngineLoop

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    role: str  # "prefill" | "decode"
    worker_id: str
    address: str  # what routers and peers dial
    transfer_backend: str
    credential: ClusterCredential | None = None  # cluster tokens as ``worker_id`` (None: no cluster secret)
    served_model: str = ""  # the base model's name routers pool this worker under ("": the router's default)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker serves, whatever its role (the CLI's worker flags)."""

    addr: str = "127.0.0.1:0"
    grace_s: float = 30.0
    routers: tuple[str, ...] = ()
    step_delay_s: float = 0.0  # fault injection / tests: slow every engine step down
    metrics_port: int = 0  # 0: off, -1: any free port
    tls: TlsConfig | None = None
    advertise_host: str = ""  # the host peers dial, when the bind address is a wildcard
    cluster_secret: str | None = None  # every Prefill/Decode call must carry a token made with it (None: dev, open)
    served_model: str = ""  # --served-model-name ("": the router's default model)

    @property
    def bind_host(self) -> str:
        return self.addr.rsplit(":", 1)[0]


def advertise(endpoint: str, host: str) -> str:
    """Replace a wildcard bind address in ``scheme://host:port`` by the address peers should dial."""
    scheme, _, rest = endpoint.partition("://")
    bound, _, port = rest.rpartition(":")
    if host and bound in ("0.0.0.0", "::", "[::]", ""):
        return f"{scheme}://{host}:{port}"
    return endpoint


class WorkerServicer:
    """What every worker answers (GetLoad, KVEvents) and the state the lifecycle drives (draining, in flight).

    Subclasses set ``service`` (the proto service name) and list themselves after this class and before the
    generated servicer base, e.g. ``class PrefillServicer(WorkerServicer, pb_grpc.PrefillServicer)``.
    """

    service: ClassVar[str]

    def __init__(self, loop: EngineLoop, identity: WorkerIdentity):
        self.loop = loop
        self.identity = identity
        self.draining = False
        self.in_flight = 0
        self.num_aborted = 0  # aborts seen by this service alone (a cancelled prefill); engine aborts: loop.num_aborted
        self.adapters: tuple[str, ...] = ()  # registered LoRA adapters, as of the last load/unload (engine thread)
        self.api_adapters = AdapterRecords()  # those loaded through the router's Admin API, and tombstones

    def _note_adapters(self, engine) -> None:
        """On the engine thread: remember the engine's adapters for GetLoad (read on the event loop)."""
        self.adapters = tuple(sorted(engine.adapters()))

    def resident_adapters(self) -> tuple[str, ...]:
        """The adapters in the engine's device slots now (engine.lora.slots; read without the engine thread: a
        snapshot of a list that step swaps may change right after, good enough for routing)."""
        slots = getattr(getattr(self.loop.engine, "lora", None), "slots", None)
        if slots is None:
            return ()
        return tuple(sorted(a.name for a in list(slots.occupant) if a is not None and not a.retired))

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise CapacityError("worker is draining")

    @property
    def busy(self) -> bool:
        """Work that a graceful stop waits for."""
        return self.in_flight > 0

    def ready_fields(self) -> list[str]:
        """Role fields of the ready line, between the address and ``metrics=``."""
        return []

    def load_fields(self) -> dict:
        """Role fields of WorkerLoad."""
        return {}

    def background(self) -> list[Coroutine]:
        """Coroutines that run while the worker serves (cancelled at stop)."""
        return []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        getattr(pb_grpc, f"add_{self.service}Servicer_to_server")(self, server)

    # ---- RPCs shared by both roles ------------------------------------------------------------------
    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.WorkerLoad:
        load = self.load()
        if request.check_integrity:
            load.integrity_error, load.num_live_blocks = await self.loop.acall(integrity)
        return load

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
                          ) -> pb.LoadAdapterResponse:
        """Load (or replace) a LoRA adapter in this worker's engine, on the engine thread between steps."""
        name, path, version = request.name, request.path, request.version

        def install(engine, adapter):
            self.api_adapters.check_load(name, version)  # again: an unload may have come meanwhile
            engine.install_adapter(adapter)
            self._note_adapters(engine)

        try:
            check_name(name, "name")
            if not path:
                raise InvalidRequestError("path: must name a PEFT adapter directory on the worker")
            self.api_adapters.check_load(name, version)
            # the files are read and checked on a thread of their own: steps go on meanwhile
            adapter = await asyncio.to_thread(self.loop.engine.read_adapter, name, path)
            await self.loop.acall(lambda engine: install(engine, adapter))
            self.api_adapters.loaded(name, path, version)  # on the event loop, like every records change
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)
        logger.info("loaded adapter %s from %s", name, path)
        return pb.LoadAdapterResponse(worker_ids=[self.identity.worker_id])

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
                            ) -> pb.UnloadAdapterResponse:
        """Unload an adapter: new requests for it are refused (NOT_FOUND), running ones finish."""
        name = request.name

        def unload(engine) -> bool:
            dropped = engine.unload_adapter(name)
            self._note_adapters(engine)
            return dropped

        try:
            dropped = await self.loop.acall(unload)
            self.api_adapters.unloaded(name, request.version)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            await abort_with(context, e)
        logger.info("unloaded adapter %s (%s)", name, "was loaded" if dropped else "was not loaded")
        return pb.UnloadAdapterResponse(unloaded=dropped, worker_ids=[self.identity.worker_id] if dropped else [])

    async def KVEvents(self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.KVEventBatch]:
        async for batch in kv_event_stream(self.loop, self.identity.worker_id):
            yield batch

    def load(self) -> pb.WorkerLoad:
        e = self.loop.engine
        return load_to_proto(
            self.loop.stats,
            worker_id=self.identity.worker_id,
            role=self.identity.role,
            address=self.identity.address,
            draining=self.draining,
            fingerprint=e.fingerprint,
            transfer_backend=self.identity.transfer_backend,
            max_model_len=e.max_model_len,
            max_num_seqs=e.config.max_num_seqs,
            vocab_size=e.vocab_size,
            num_aborted=self.num_aborted + self.loop.num_aborted,
            device=e.config.device,
            last_abort_latency_s=self.loop.last_abort_latency_s,
            served_model=self.identity.served_model,
            adapters=self.adapters,
            resident_adapters=self.resident_adapters(),
            api_adapters=[pb.AdapterRecord(name=r.name, path=r.path, version=r.version, unloaded=r.unloaded)
                          for r in self.api_adapters.all()],
            **self.load_fields(),
        )


async def drain(servicer: WorkerServicer, grace_s: float, interval_s: float = 0.05) -> bool:
    """Refuse new work and wait up to ``grace_s`` for in-flight work to finish; True if it all did."""
    servicer.draining = True
    deadline = time.monotonic() + grace_s
    while servicer.busy and time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
    return not servicer.busy


ServicerFactory = Callable[["EngineLoop", WorkerIdentity], WorkerServicer]


class TransferSettings(Protocol):
    backend: str  # all the lifecycle reads of a role's transfer config (the role owns the rest)


RoleStart = Callable[
    ["EngineConfig", TransferSettings, WorkerOptions], AbstractAsyncContextManager[tuple["LLMEngine", ServicerFactory]]
]


def worker_server(role: str, start: RoleStart):
    """The ``serve`` of a role: ``start`` builds the role's engine and KV transfer end and yields the engine and
    a servicer factory; it closes what it opened when the worker stops."""

    async def serve(
        engine_config: EngineConfig,
        transfer_config: TransferSettings,
        addr: str = "127.0.0.1:0",
        *,
        ready: asyncio.Future | None = None,
        stop: asyncio.Event | None = None,
        **options,
    ) -> None:
        """Serve until SIGTERM/SIGINT or ``stop``; ``options`` are ``WorkerOptions`` fields (grace_s, routers...)."""
        opts = WorkerOptions(addr, **options)
        async with start(engine_config, transfer_config, opts) as (engine, make_servicer):
            await run_worker(role, engine, make_servicer, opts, transfer_config.backend, ready, stop)

    return serve


async def run_worker(
    role: str,
    engine: LLMEngine,
    make_servicer: ServicerFactory,
    options: WorkerOptions,
    transfer_backend: str,
    ready: asyncio.Future | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``role`` until SIGTERM/SIGINT (or ``stop``), then drain and stop; ``engine`` runs on its own thread.

    Prints ``PDSERVE_READY <role> <address> [role fields] metrics=<port>`` once serving (the launcher
    parses it) and sets ``ready`` to the address.
    """
    from pdserve.engine.engine_loop import EngineLoop  # torch: only a worker pays for it

    loop = EngineLoop(engine, name=f"{role}-engine", step_delay_s=options.step_delay_s)
    worker_id = f"{role}-{uuid.uuid4().hex[:6]}"
    credential = ClusterCredential(options.cluster_secret, worker_id) if options.cluster_secret else None
    interceptors = [ClusterAuthInterceptor(credential)] if credential is not None else None
    server, port, health = create_server(options.addr, [role.capitalize()], options.tls, interceptors)
    identity = WorkerIdentity(
        role, worker_id, f"{options.advertise_host or options.bind_host}:{port}", transfer_backend, credential,
        options.served_model,
    )
    servicer = make_servicer(loop, identity)
    servicer._note_adapters(engine)  # the engine thread has not started: adapters loaded at start (--lora)
    servicer.add_to_server(server)
    collector = WorkerCollector(role, servicer.load, lambda: servicer.in_flight, lambda: loop.stats.generated_tokens)
    loop.on_step = STEP_SECONDS.labels(worker_id).observe
    loop.start()
    tasks: list[asyncio.Task] = []
    try:
        bound_metrics = serve_metrics(options.metrics_port, options.bind_host, collector)
        await server.start()
        await set_serving(health, [servicer.service], True)
        tasks = [asyncio.create_task(c) for c in servicer.background()]
        print(" ".join(["PDSERVE_READY", role, identity.address, *servicer.ready_fields(),
                        f"metrics={bound_metrics}"]), flush=True)
        logger.info("%s worker %s serving on %s", role, identity.worker_id, identity.address)
        if ready is not None:
            ready.set_result(identity.address)
        await _until_stopped(identity, options, stop or asyncio.Event())
        logger.info("draining %s worker (%d in flight)", role, servicer.in_flight)
        servicer.draining = True  # before NOT_SERVING: whoever sees it finds new work refused
        await set_serving(health, [servicer.service], False)
        if not await drain(servicer, options.grace_s):
            logger.warning("grace period over with %d requests in flight; stopping", servicer.in_flight)
    finally:
        for t in tasks:
            t.cancel()
        await server.stop(1.0)
        loop.stop()
        collector.unregister()


async def _until_stopped(identity: WorkerIdentity, options: WorkerOptions, stop: asyncio.Event) -> None:
    """Wait for SIGTERM/SIGINT or ``stop``, registered with the routers meanwhile; they hear goodbye at once."""
    install_sigterm(stop)
    if not options.routers:
        await stop.wait()
        return
    registration = asyncio.create_task(
        heartbeat(list(options.routers), identity.address, identity.role, stop, tls=options.tls,
                  credential=identity.credential)
    )
    await stop.wait()
    await registration  # says goodbye: routers stop sending new work at once
