"""Run a decode worker: engine thread + KV receiver + gRPC server, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from pdserve.decode.service import DecodeServicer, WorkerIdentity
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.engine_loop import EngineLoop
from pdserve.kvtransfer import make_receiver
from pdserve.kvtransfer.base import TransferConfig
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.observability import STEP_SECONDS, register_worker_collector, serve_metrics
from pdserve.serving.rpc import TlsConfig, create_server, heartbeat, install_sigterm, set_serving

logger = logging.getLogger(__name__)
SERVICES = ["Decode"]


def advertise(endpoint: str, host: str) -> str:
    """Replace a wildcard bind address in ``scheme://host:port`` by the address peers should dial."""
    scheme, _, rest = endpoint.partition("://")
    bound, _, port = rest.rpartition(":")
    if host and bound in ("0.0.0.0", "::", "[::]", ""):
        return f"{scheme}://{host}:{port}"
    return endpoint


async def serve(
    engine_config: EngineConfig,
    transfer_config: TransferConfig,
    addr: str = "127.0.0.1:0",
    grace_s: float = 30.0,
    ready: asyncio.Future | None = None,
    stop: asyncio.Event | None = None,
    routers: tuple[str, ...] = (),
    step_delay_s: float = 0.0,
    metrics_port: int = 0,
    tls: TlsConfig | None = None,
    advertise_host: str = "",
) -> None:
    shared = transfer_config.backend == "tcp" and transfer_config.allow_shm and engine_config.device == "cpu"
    engine = await asyncio.to_thread(LLMEngine, engine_config, shared, True)
    receiver = make_receiver(transfer_config, engine.runner.kv.layers, engine.fingerprint, engine.runner.kv.shm_path)
    kv_endpoint = advertise(receiver.start(), advertise_host)
    loop = EngineLoop(engine, name="decode-engine", step_delay_s=step_delay_s).start()
    server, port, health = create_server(addr, SERVICES, tls)
    host = addr.rsplit(":", 1)[0]
    identity = WorkerIdentity(f"decode-{uuid.uuid4().hex[:6]}", f"{advertise_host or host}:{port}",
                              transfer_config.backend)
    servicer = DecodeServicer(loop, receiver, kv_endpoint, identity, transfer_config.timeout_s, tls=tls)
    pb_grpc.add_DecodeServicer_to_server(servicer, server)
    loop.on_step = STEP_SECONDS.labels("decode").observe
    register_worker_collector("decode", servicer.load, lambda: servicer.in_flight)
    bound_metrics = serve_metrics(metrics_port, host)
    await server.start()
    await set_serving(health, SERVICES, True)
    sweeper = asyncio.create_task(servicer.sweep_expired())
    print(f"PDSERVE_READY decode {identity.address} kv={kv_endpoint} metrics={bound_metrics}", flush=True)
    logger.info("decode worker %s serving on %s, KV endpoint %s", identity.worker_id, identity.address, kv_endpoint)
    if ready is not None:
        ready.set_result(identity.address)
    stop = stop or asyncio.Event()
    install_sigterm(stop)
    registration = asyncio.create_task(heartbeat(list(routers), identity.address, "decode", stop, tls=tls)) if routers else None
    await stop.wait()
    if registration is not None:
        await registration  # says goodbye: routers stop sending new work at once
    # graceful: NOT_SERVING, refuse new work, let in-flight streams finish, then exit
    logger.info("draining decode worker (%d in flight)", servicer.in_flight)
    servicer.draining = True
    await set_serving(health, SERVICES, False)
    deadline = time.monotonic() + grace_s
    while (servicer.in_flight or servicer.deadlines) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    sweeper.cancel()
    await server.stop(1.0)
    loop.stop()
    receiver.close()
    engine.runner.kv.close()
