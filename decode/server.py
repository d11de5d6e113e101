"""Run a decode worker: engine + KV receiver on the shared worker base."""

from __future__ import annotations

import asyncio

from pdserve.decode.service import DecodeServicer
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.engine_loop import EngineLoop
from pdserve.kvtransfer import make_receiver
from pdserve.kvtransfer.base import TransferConfig
from pdserve.serving.worker import WorkerOptions, advertise, run_worker


async def serve(
    engine_config: EngineConfig,
    transfer_config: TransferConfig,
    addr: str = "127.0.0.1:0",
    *,
    ready: asyncio.Future | None = None,
    stop: asyncio.Event | None = None,
    **options,
) -> None:
    """Serve until SIGTERM/SIGINT or ``stop``; ``options`` are ``WorkerOptions`` fields (grace_s, routers...)."""
    opts = WorkerOptions(addr, **options)
    # same-host peers write KV straight into a shared-memory cache
    shared = transfer_config.backend == "tcp" and transfer_config.allow_shm and engine_config.device == "cpu"
    engine = await asyncio.to_thread(LLMEngine, engine_config, shared_kv=shared, record_events=True)
    kv = engine.runner.kv
    receiver = make_receiver(transfer_config, kv.layers, engine.fingerprint, kv.shm_path)
    try:
        kv_endpoint = advertise(receiver.start(), opts.advertise_host)
        await run_worker(
            "decode",
            EngineLoop(engine, name="decode-engine", step_delay_s=opts.step_delay_s),
            lambda loop, identity: DecodeServicer(
                loop, identity, receiver, kv_endpoint, transfer_config.timeout_s, tls=opts.tls
            ),
            opts,
            transfer_config.backend,
            ready,
            stop,
        )
    finally:
        receiver.close()
        kv.close()
