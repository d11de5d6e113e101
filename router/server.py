"""Run the router: membership polling + Generation and Admin services, until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from engine.models import resolve_model
from engine.tokenizer import load_tokenizer
from protos import pdserve_pb2_grpc as pb_grpc
from protos.rpc import create_server, install_sigterm, set_serving
from router.admin import AdminServicer
from router.membership import Membership
from router.policy import PairPolicy
from router.service import GenerationServicer

logger = logging.getLogger(__name__)
SERVICES = ["Generation", "Admin"]


def load_worker_config(path: str | None, prefill: list[str], decode: list[str]) -> tuple[list[str], list[str]]:
    """Workers from flags plus an optional JSON file {"prefill": [...], "decode": [...]}."""
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"config: cannot read worker list {path!r}: {e}") from None
        prefill = [*prefill, *data.get("prefill", [])]
        decode = [*decode, *data.get("decode", [])]
    return prefill, decode


async def serve(
    model: str,
    prefill: list[str],
    decode: list[str],
    addr: str = "127.0.0.1:0",
    policy: str = "round_robin",
    ready: asyncio.Future | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    path, _ = resolve_model(model)
    tokenizer = await asyncio.to_thread(load_tokenizer, path)
    membership = Membership()
    for a in prefill:
        membership.add(a, "prefill")
    for a in decode:
        membership.add(a, "decode")
    await membership.poll_once()
    membership.start()
    server, port, health = create_server(addr, SERVICES)
    generation = GenerationServicer(membership, PairPolicy(policy), tokenizer)
    pb_grpc.add_GenerationServicer_to_server(generation, server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(membership), server)
    await server.start()
    await set_serving(health, SERVICES, True)
    address = f"{addr.rsplit(':', 1)[0]}:{port}"
    print(f"PDSERVE_READY router {address}", flush=True)
    logger.info("router serving on %s (%d prefill, %d decode, policy %s)", address, len(prefill), len(decode), policy)
    if ready is not None:
        ready.set_result(address)
    stop = stop or asyncio.Event()
    install_sigterm(stop)
    await stop.wait()
    await set_serving(health, SERVICES, False)
    await server.stop(5.0)
    await membership.close()
