"""The router's edge: worker protos -> router domain types (load snapshots, KV events) and back for Admin.

Each conversion runs once per message received (a poll, an event batch); nothing inside the router keeps a
proto. The KV-event subscription that feeds the prefix index lives here too, since it reads the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import fields

import grpc

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.load import WorkerLoad
from pdserve.router.prefix_index import BlockEvents, PrefixIndex
from pdserve.serving.adapter_records import AdapterRecord
from pdserve.serving.convert import fingerprint_from_proto, fingerprint_to_proto

logger = logging.getLogger(__name__)

_LISTS = ("adapters", "resident_adapters")
_SCALARS = tuple(f.name for f in fields(WorkerLoad)
                 if f.name not in ("fingerprint", "api_adapters") and f.name not in _LISTS)


def load_from_proto(msg: pb.WorkerLoad) -> WorkerLoad:
    """A poll's answer as the router's snapshot; an unusable fingerprint counts as none reported."""
    fingerprint = None
    if msg.HasField("fingerprint"):
        try:
            fingerprint = fingerprint_from_proto(msg.fingerprint)
        except ValueError as e:
            logger.warning("worker %s reports an unusable layout: %s", msg.address or msg.worker_id, e)
    records = tuple(AdapterRecord(r.name, r.path, r.version, r.unloaded) for r in msg.api_adapters)
    return WorkerLoad(fingerprint=fingerprint, **{name: getattr(msg, name) for name in _SCALARS},
                      **{name: tuple(getattr(msg, name)) for name in _LISTS}, api_adapters=records)


def load_to_proto(load: WorkerLoad) -> pb.WorkerLoad:
    msg = pb.WorkerLoad(**{name: getattr(load, name) for name in _SCALARS + _LISTS})
    msg.api_adapters.extend(pb.AdapterRecord(name=r.name, path=r.path, version=r.version, unloaded=r.unloaded)
                            for r in load.api_adapters)
    if load.fingerprint is not None:
        msg.fingerprint.CopyFrom(fingerprint_to_proto(load.fingerprint))
    return msg


def events_from_proto(batch: pb.KVEventBatch) -> BlockEvents:
    return BlockEvents(seq=batch.seq, snapshot=batch.snapshot, cleared=batch.cleared, stored=tuple(batch.stored),
                       evicted=tuple(batch.evicted))


async def follow(index: PrefixIndex, worker: str, stub, stop: asyncio.Event, backoff_s: float = 0.2,
                 metadata: Callable[[], tuple | None] = lambda: None) -> None:
    """Keep ``worker``'s part of the index in sync; resubscribe (fresh snapshot) after any break. ``metadata()``
    gives each subscription's call metadata (its cluster token)."""
    delay = backoff_s
    while not stop.is_set():
        try:
            async for batch in stub.KVEvents(pb.KVEventsRequest(), metadata=metadata()):
                index.apply(worker, events_from_proto(batch))
                delay = backoff_s
        except grpc.aio.AioRpcError as e:
            logger.debug("KV events from %s broke: %s", worker, e.code().name)
        index.remove_worker(worker)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, 5.0)
