"""Run a prefill worker: engine (with the KV pusher as its connector) + KV sender on the shared worker base."""

from __future__ import annotations

import asyncio

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.engine_loop import EngineLoop
from pdserve.kvtransfer import make_sender
from pdserve.kvtransfer.base import TransferConfig
from pdserve.prefill.pusher import LayerPusher
from pdserve.prefill.service import PrefillServicer
from pdserve.serving.worker import WorkerOptions, run_worker


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
    pusher = LayerPusher(engine_config.block_size, cuda=engine_config.device.startswith("cuda"))
    engine = await asyncio.to_thread(LLMEngine, engine_config, record_events=True, kv_connector=pusher)
    sender = make_sender(transfer_config, engine.runner.kv.layers, engine.fingerprint)
    try:
        await run_worker(
            "prefill",
            EngineLoop(engine, name="prefill-engine", step_delay_s=opts.step_delay_s),
            lambda loop, identity: PrefillServicer(loop, identity, sender, pusher, transfer_config.timeout_s),
            opts,
            transfer_config.backend,
            ready,
            stop,
        )
    finally:
        sender.close()
