"""NCCL backend: torch.distributed point-to-point for the data plane, the TCP control plane for the rest.

Each (sender, receiver) link gets its own standalone process group of world size 2, built on a TCPStore
the receiver hosts (a PrefixStore per link), so no global default group is touched and links come and go
at run time. CUDA caches use ProcessGroupNCCL; CPU caches use ProcessGroupGloo, which runs the same code
path here on CPU (NCCL refuses two ranks on one GPU; there UCX cuda_ipc is the path).

Per pushed layer the sender sends one DATA frame per run of blocks that is consecutive on both sides; the
header goes over TCP, the payload by ``pg.send`` of the source view, received by ``pg.recv`` straight into
the destination view. Both sides handle frames in connection order, so sends and receives pair up.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import uuid

import torch
import torch.distributed as dist

from kvtransfer import wire
from kvtransfer.base import TransferError
from kvtransfer.tcp import SocketReceiver, SocketSender, _Conn, _Tx, byte_view, pair_runs

logger = logging.getLogger(__name__)


def _new_group(store, rank: int, device_type: str, timeout_s: float):
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, 2, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


def _wait(work, timeout_s: float) -> None:
    try:
        ok = work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo/NCCL report a dead peer this way
        raise TransferError(f"process-group transfer failed: {e}") from None
    if not ok:
        raise TransferError("process-group transfer timed out")


class NcclReceiver(SocketReceiver):
    scheme = "nccl"

    def __init__(self, layers, fingerprint, config, shm_path=None):
        super().__init__(layers, fingerprint, config, None)  # no shm: the data plane is the process group
        self.data_path = "nccl" if layers[0].is_cuda else "gloo"
        self._store = None
        self._groups: dict[socket.socket, object] = {}
        self._links: dict[socket.socket, str] = {}
        self._glock = threading.Lock()

    def start(self) -> str:
        self._store = dist.TCPStore(self.config.host, 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=self.config.timeout_s))
        return super().start()

    def challenge_extra(self) -> dict:
        extra = super().challenge_extra()
        extra.update(store_host=self.config.host, store_port=self._store.port, link=uuid.uuid4().hex)
        return extra

    def on_connected(self, sock: socket.socket, hello: dict) -> None:
        link = hello.get("link", "")
        if not link:
            raise TransferError("nccl handshake: sender named no link")
        store = dist.PrefixStore(f"pdserve-kv/{link}/", self._store)
        pg = _new_group(store, 0, self.layers[0].device.type, self.config.timeout_s)
        with self._glock:
            self._groups[sock] = pg

    def on_disconnected(self, sock: socket.socket) -> None:
        with self._glock:
            self._groups.pop(sock, None)

    def receive_payload(self, sock: socket.socket, frame: wire.Frame) -> None:
        pg = self._groups[sock]
        layer = self.layers[frame.layer]
        start, n = frame.block_ids[0], len(frame.block_ids)
        if frame.block_ids != list(range(start, start + n)):
            raise wire.WireError("nccl DATA frames carry one consecutive run of blocks")
        _wait(pg.recv([layer[start : start + n]], 1, 0), self.config.timeout_s)

    def drop_payload(self, sock: socket.socket, frame: wire.Frame) -> None:
        pg = self._groups[sock]
        scratch = torch.empty((len(frame.block_ids), *self.layers[0].shape[1:]),
                              dtype=self.layers[0].dtype, device=self.layers[0].device)
        _wait(pg.recv([scratch], 1, 0), self.config.timeout_s)


class NcclSender(SocketSender):
    scheme = "nccl"

    def __init__(self, layers, fingerprint, config):
        super().__init__(layers, fingerprint, config)
        self._groups: dict[int, object] = {}

    def map_shm(self, challenge: dict):
        return None

    def on_connected(self, conn: _Conn) -> None:
        ch = conn.challenge
        link = ch.get("link")
        if not link or "store_port" not in ch:
            raise TransferError("nccl handshake: the receiver offered no process-group rendezvous")
        store = dist.TCPStore(ch["store_host"], int(ch["store_port"]), is_master=False,
                              timeout=datetime.timedelta(seconds=self.config.timeout_s))
        prefix = dist.PrefixStore(f"pdserve-kv/{link}/", store)
        self._groups[id(conn)] = (_new_group(prefix, 1, self.layers[0].device.type, self.config.timeout_s), store)
        conn.path = "nccl" if self.layers[0].is_cuda else "gloo"

    def send_data(self, conn: _Conn, tx: _Tx, layer: int, src: list[int], dst: list[int]) -> None:
        pg = self._groups[id(conn)][0]
        src_layer = self.layers[layer]
        for s, d, n in pair_runs(src, dst):
            view = src_layer[s : s + n]
            crc = 0
            flags = 0
            if self.config.checksum:
                crc = wire.crc32([byte_view(view.cpu() if view.is_cuda else view)])
                flags = wire.F_CHECKSUM
            frame = wire.Frame(wire.DATA, tx.transfer_id, layer, list(range(d, d + n)), n * self.block_bytes, crc, flags)
            conn.sock.sendall(wire.encode_header(frame))
            _wait(pg.send([view], 0, 0), self.config.timeout_s)
            tx.num_frames += 1
