"""NCCL backend: torch.distributed point-to-point for the data plane, the shared TCP control plane for the
rest.

Each (sender, receiver) link gets its own standalone process group of world size 2, so the global default
group is never touched and links come and go at run time. The receiver hosts one ``TCPStore``; after the
handshake (fingerprint, auth) HELLO_OK names the store and a fresh random link id, and both sides build a
group on ``PrefixStore("pdserve-kv/<link>/", store)``: receiver rank 0, sender rank 1.

Backend choice: config ``backend="nccl"`` builds ``ProcessGroupNCCL`` when the cache tensors are CUDA and
``ProcessGroupGloo`` when they are CPU tensors (NCCL cannot move host memory), so the same code path runs
and is tested here on CPU. Stats.path says which ("nccl" or "gloo"). Note that NCCL refuses two ranks on
one GPU; between processes on one GPU use the ucx backend (cuda_ipc).

Per pushed layer the sender sends one DATA header per run of blocks consecutive on both sides over TCP,
then ``pg.send`` of the source view; the receiver posts ``pg.recv`` straight into the destination view.
Both sides handle frames in connection order, so sends and receives pair up. Every wait is bounded by
``config.timeout_s``; a dead peer surfaces as a gloo/NCCL error, turned into TransferError.
"""

from __future__ import annotations

import datetime
import logging
import uuid

import torch
import torch.distributed as dist

from pdserve.kvtransfer import control, wire
from pdserve.kvtransfer.base import TransferError
from pdserve.kvtransfer.connection import Connection, Tx
from pdserve.kvtransfer.receiver import Link, SocketReceiver
from pdserve.kvtransfer.sender import SocketSender
from pdserve.kvtransfer.views import is_one_run

logger = logging.getLogger(__name__)

STORE_PREFIX = "pdserve-kv"


def new_group(store, rank: int, device: torch.device, local_addr: str, timeout_s: float):
    """A standalone 2-rank process group (rank 0: receiver, rank 1: sender)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # bind to the address the control connection uses, not whatever the hostname resolves to
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_addr)]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def shutdown_group(pg) -> None:
    """Stop a link's group now (its threads must not outlive the link: a dead peer's gloo threads left
    for interpreter exit abort the process)."""
    try:
        pg.abort()
    except RuntimeError as e:
        logger.debug("process group abort: %s", e)


def run_work(start, timeout_s: float) -> None:
    """Start a point-to-point op (``start()`` returns its Work) and wait for it, at most ``timeout_s``."""
    try:
        ok = start().wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo/NCCL report a dead peer, a timeout or misuse this way
        raise TransferError(f"process-group transfer failed: {e}") from None
    if ok is False:
        raise TransferError("process-group transfer timed out")


class NcclReceiver(SocketReceiver):
    scheme = "nccl"

    def __init__(self, layers, fingerprint, config, shm_path=None):
        super().__init__(layers, fingerprint, config, None)  # the data plane is the process group
        self.device = layers[0].device
        self.data_path = "nccl" if self.device.type == "cuda" else "gloo"
        self._store: dist.TCPStore | None = None

    def start(self) -> str:
        timeout = datetime.timedelta(seconds=self.config.timeout_s)
        self._store = dist.TCPStore(self.config.host, 0, is_master=True, wait_for_workers=False,
                                    timeout=timeout)
        return super().start()

    def close(self) -> None:
        super().close()  # links are closed and their groups gone; now the rendezvous store
        self._store = None

    def welcome_extra(self, link: Link, hello: control.Hello) -> dict:
        local = link.sock.getsockname()[0]  # the address this peer reached us on
        return {"store_host": local, "store_port": self._store.port, "link": uuid.uuid4().hex}

    def on_connected(self, link: Link, hello: control.Hello, extra: dict) -> None:
        store = dist.PrefixStore(f"{STORE_PREFIX}/{extra['link']}/", self._store)
        link.plane = new_group(store, 0, self.device, extra["store_host"], self.config.timeout_s)

    def on_disconnected(self, link: Link) -> None:
        plane, link.plane = link.plane, None
        if plane is not None:
            shutdown_group(plane)

    def check_frame(self, link: Link, frame: wire.Frame) -> None:
        if frame.type == wire.DATA and not is_one_run(frame.block_ids):
            raise wire.WireError("nccl DATA frames carry one run of consecutive blocks")

    def receive_payload(self, link: Link, frame: wire.Frame) -> None:
        start, n = frame.block_ids[0], len(frame.block_ids)
        dst = self.layers[frame.layer][start : start + n]
        run_work(lambda: link.plane.recv([dst], 1, 0), self.config.timeout_s)

    def drop_payload(self, link: Link, frame: wire.Frame) -> None:
        # bounded: _check capped the frame at the cache's block count
        scratch = torch.empty((len(frame.block_ids), *self.layers[0].shape[1:]), dtype=self.layers[0].dtype,
                              device=self.device)
        run_work(lambda: link.plane.recv([scratch], 1, 0), self.config.timeout_s)


class NcclSender(SocketSender):
    scheme = "nccl"

    def on_connected(self, conn: Connection) -> None:
        w = conn.welcome
        if not w.get("link") or not isinstance(w.get("store_port"), int):
            raise TransferError("nccl handshake: the receiver offered no process-group rendezvous")
        timeout = datetime.timedelta(seconds=self.config.timeout_s)
        store = dist.TCPStore(str(w["store_host"]), w["store_port"], is_master=False, timeout=timeout)
        prefix = dist.PrefixStore(f"{STORE_PREFIX}/{w['link']}/", store)
        local = conn.sock.getsockname()[0]
        device = self.layers[0].device
        conn.plane = (new_group(prefix, 1, device, local, self.config.timeout_s), store)
        conn.path = "nccl" if device.type == "cuda" else "gloo"

    def on_disconnected(self, conn: Connection) -> None:
        plane, conn.plane = conn.plane, None
        if plane is not None:
            shutdown_group(plane[0])

    def send_layer(self, conn: Connection, tx: Tx, layer: int, src: list[int], dst: list[int]) -> None:
        if conn.plane is None:
            raise TransferError(f"connection to {conn.endpoint} is closed")
        pg = conn.plane[0]

        def put(_conn: Connection, view: torch.Tensor) -> None:
            run_work(lambda: pg.send([view], 0, 0), self.config.timeout_s)

        self.send_run_frames(conn, tx, layer, src, dst, put)
