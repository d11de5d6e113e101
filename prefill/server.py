"""Run a prefill worker: its engine, with the KV pusher as the engine's connector, and a KV sender."""

from __future__ import annotations

import asyncio
import contextlib

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.kvtransfer import make_sender
from pdserve.kvtransfer.base import TransferConfig
from pdserve.prefill.pusher import LayerPusher
from pdserve.prefill.service import PrefillServicer
from pdserve.serving.worker import WorkerOptions, worker_server


@contextlib.asynccontextmanager
async def start(engine_config: EngineConfig, transfer_config: TransferConfig, options: WorkerOptions):
    pusher = LayerPusher(engine_config.block_size, cuda=engine_config.device.startswith("cuda"))
    engine = await asyncio.to_thread(LLMEngine, engine_config, record_events=True, kv_connector=pusher)
    sender = make_sender(transfer_config, engine.runner.kv.layers, engine.fingerprint)
    try:
        yield engine, lambda loop, identity: PrefillServicer(loop, identity, sender, pusher, transfer_config.timeout_s)
    finally:
        sender.close()


serve = worker_server("prefill", start)
