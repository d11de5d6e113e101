"""Run a prefill worker: engine thread + KV sender + gRPC server, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.engine_loop import EngineLoop
from pdserve.kvtransfer import make_sender
from pdserve.kvtransfer.base import TransferConfig
from pdserve.prefill.service import PrefillIdentity, PrefillServicer
from pdserve.protos import pdserve_pb2_grpc as pb_grpc
from pdserve.serving.observability import STEP_SECONDS, register_worker_collector, serve_metrics
from pdserve.serving.rpc import TlsConfig, create_server, heartbeat, install_sigterm, set_serving

logger = logging.getLogger(__name__)
SERVICES = ["Prefill"]


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
    engine = await asyncio.to_thread(LLMEngine, engine_config, False, True)
    sender = make_sender(transfer_config, engine.runner.kv.layers, engine.fingerprint)
    loop = EngineLoop(engine, name="prefill-engine", step_delay_s=step_delay_s)
    server, port, health = create_server(addr, SERVICES, tls)
    host = addr.rsplit(":", 1)[0]
    identity = PrefillIdentity(f"prefill-{uuid.uuid4().hex[:6]}", f"{advertise_host or host}:{port}",
                               transfer_config.backend)
    servicer = PrefillServicer(loop, sender, identity, transfer_config.timeout_s)
    loop.start()
    pb_grpc.add_PrefillServicer_to_server(servicer, server)
    loop.on_step = STEP_SECONDS.labels("prefill").observe
    register_worker_collector("prefill", servicer.load, lambda: servicer.in_flight)
    bound_metrics = serve_metrics(metrics_port, host)
    await server.start()
    await set_serving(health, SERVICES, True)
    print(f"PDSERVE_READY prefill {identity.address} metrics={bound_metrics}", flush=True)
    logger.info("prefill worker %s serving on %s", identity.worker_id, identity.address)
    if ready is not None:
        ready.set_result(identity.address)
    stop = stop or asyncio.Event()
    install_sigterm(stop)
    registration = asyncio.create_task(heartbeat(list(routers), identity.address, "prefill", stop, tls=tls)) if routers else None
    await stop.wait()
    if registration is not None:
        await registration  # says goodbye: routers stop sending new work at once
    logger.info("draining prefill worker (%d in flight)", servicer.in_flight)
    servicer.draining = True
    await set_serving(health, SERVICES, False)
    deadline = time.monotonic() + grace_s
    while servicer.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.stop(1.0)
    loop.stop()
    sender.close()
