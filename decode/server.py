"""Run a decode worker: its engine and a KV receiver writing into the engine's cache."""

from __future__ import annotations

import asyncio
import contextlib

from pdserve.decode.service import DecodeServicer
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.kvtransfer import make_receiver
from pdserve.kvtransfer.base import TransferConfig
from pdserve.serving.worker import WorkerOptions, advertise, worker_server


@contextlib.asynccontextmanager
async def start(engine_config: EngineConfig, transfer_config: TransferConfig, options: WorkerOptions):
    # same-host peers write KV straight into a shared-memory cache
    shared = transfer_config.backend == "tcp" and transfer_config.allow_shm and engine_config.device == "cpu"
    engine = await asyncio.to_thread(LLMEngine, engine_config, shared_kv=shared, record_events=True)
    kv = engine.runner.kv
    receiver = make_receiver(transfer_config, kv.layers, engine.fingerprint, kv.shm_path)
    try:
        kv_endpoint = advertise(receiver.start(), options.advertise_host)
        yield engine, lambda loop, identity: DecodeServicer(
            loop, identity, receiver, kv_endpoint, transfer_config.timeout_s, tls=options.tls
        )
    finally:
        receiver.close()
        kv.close()


serve = worker_server("decode", start)
