"""The sending half shared by every backend: the sender, its connections (``connection``) and handles.

``push_layer`` only validates and enqueues; the connection's writer thread waits on the layer's ``ready``
event, then sends (so the forward pass keeps computing), and a reader thread collects the receiver's
ACKs. A connection to an endpoint is opened once (handshake: layout fingerprint, mutual auth) and reused by
every transfer to it; losing it re-sends every transfer in flight on it on a new connection, a bounded
number of times (``resend``), before failing them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import torch

from pdserve.kvtransfer import cuda_ipc, wire
from pdserve.kvtransfer.base import (
    ChecksumError,
    KVSender,
    TransferError,
    TransferHandle,
    TransferStats,
    TransferTimeoutError,
)
from pdserve.kvtransfer.connection import Connection, Tx
from pdserve.kvtransfer.resend import Resender
from pdserve.kvtransfer.views import byte_chunks, byte_view, host_view, pair_runs, run_views, staging_buffer

logger = logging.getLogger(__name__)


class _Handle(TransferHandle):
    def __init__(self, tx: Tx, sender: SocketSender):
        self.tx = tx
        self.sender = sender

    @property
    def resends(self) -> int:
        return self.tx.resends

    def push_layer(self, layer_idx, src_block_ids, dst_block_ids, ready=None) -> None:
        tx = self.tx
        src, dst = list(src_block_ids), list(dst_block_ids)
        self.sender.check_push(layer_idx, src, dst)
        if not tx.dst_block_ids.issuperset(dst):
            raise ValueError(f"dst_block_ids: blocks outside transfer {tx.transfer_id!r}")
        with tx.lock:
            if tx.finished or tx.error:
                raise TransferError(tx.error or f"transfer {tx.transfer_id!r} already finished")
            if src:
                tx.submit(("data", tx, layer_idx, src, dst, ready))

    def finish(self, timeout: float | None = None) -> TransferStats:
        tx = self.tx
        with tx.lock:
            if tx.error:
                raise TransferError(tx.error)
            if not tx.finished:
                tx.finished = True
                tx.submit(("done", tx))
        if not tx.acked.wait(self.sender.config.timeout_s if timeout is None else timeout):
            conn = tx.conn
            conn.discard(tx)
            tx.error = f"transfer {tx.transfer_id!r}: no acknowledgement from {conn.endpoint} in time"
            raise TransferTimeoutError(tx.error)
        if tx.error:
            raise TransferError(tx.error)
        ack = tx.ack or {}
        if not ack.get("ok"):
            cls = ChecksumError if ack.get("checksum") else TransferError
            raise cls(f"transfer {tx.transfer_id!r} refused by the receiver: {ack.get('error')}")
        return TransferStats(tx.transfer_id, tx.num_bytes, tx.num_frames, time.monotonic() - tx.t0, tx.conn.path,
                             resends=tx.resends)

    def abort(self, reason: str = "") -> None:
        tx = self.tx
        with tx.lock:
            conn = tx.conn
            conn.discard(tx)
            already_failed = tx.error is not None
            tx.error = tx.error or f"aborted: {reason}"
            tx.log.clear()
            if not already_failed and not conn.dead:
                conn.q.put(("abort", tx, reason))
        tx.acked.set()


class SocketSender(KVSender):
    """A sender whose control plane is a byte stream; by default DATA payloads go in-band after their
    header. Backends override ``connect``/``on_connected``/``send_layer`` for other data planes."""

    scheme = "tcp"

    def __init__(self, layers, fingerprint, config):
        super().__init__(layers, fingerprint, config)
        if len(layers) != fingerprint.num_layers:
            raise ValueError(
                f"layers: {len(layers)} tensors for a {fingerprint.num_layers}-layer fingerprint"
            )
        self.num_blocks = int(layers[0].shape[0])
        self.block_bytes = fingerprint.block_bytes()
        self._lock = threading.Lock()
        self._conns: dict[str, Connection] = {}
        self._retired: list[Connection] = []  # dead connections whose threads may still be finishing
        self._connecting: dict[str, threading.Lock] = {}
        self._closed = False
        self._num_opened = 0
        # tests: maps a source run view to the tensor actually sent (after its checksum was taken)
        self.fault_injector: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._ipc_copier: cuda_ipc.IpcCopier | None = None  # made on the first cuda_ipc push
        self.resender = Resender(self)

    def open(self, transfer_id: str, endpoint: str, dst_block_ids: list[int], traceparent: str = "") -> TransferHandle:
        conn = self._connection(endpoint)
        tx = Tx(transfer_id, frozenset(dst_block_ids), conn, traceparent=traceparent)
        every = self.config.debug_cut_every
        if every:
            with self._lock:
                self._num_opened += 1
                tx.cut = self._num_opened % every == 0
        conn.add(tx)
        conn.submit(("begin", tx))
        return _Handle(tx, self)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.resender.close()  # no more resends; joins those under way
        with self._lock:
            conns, self._conns = [*self._conns.values(), *self._retired], {}
            self._retired = []
        for c in conns:  # joins each connection's threads, so none outlives the sender (nor runs at exit)
            c.close()

    def _connection(self, endpoint: str) -> Connection:
        with self._lock:
            if self._closed:
                raise TransferError("sender is closed")
            conn = self._conns.get(endpoint)
            if conn is not None and not conn.dead:
                return conn
            connecting = self._connecting.setdefault(endpoint, threading.Lock())
        with connecting:  # one handshake per endpoint at a time; other endpoints are not held up
            with self._lock:
                conn = self._conns.get(endpoint)
                if conn is not None and not conn.dead:
                    return conn
            conn = Connection(self, endpoint)
            with self._lock:
                self._conns[endpoint] = conn
            return conn

    def forget(self, conn: Connection) -> None:
        with self._lock:
            if self._conns.get(conn.endpoint) is conn:
                del self._conns[conn.endpoint]
            self._retired = [c for c in self._retired if c.alive()]
            self._retired.append(conn)

    def check_push(self, layer: int, src: list[int], dst: list[int]) -> None:
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer_idx: {layer} out of range for {len(self.layers)} layers")
        if len(src) != len(dst):
            raise ValueError("src_block_ids: differs in length from dst_block_ids")
        if any(not 0 <= b < self.num_blocks for b in src):
            raise ValueError(f"src_block_ids: outside the cache of {self.num_blocks} blocks")
        if len(set(dst)) != len(dst):
            raise ValueError("dst_block_ids: repeats a block")

    # ---- runs on the writer thread -----------------------------------------------------------------
    def push(self, conn: Connection, tx: Tx, layer: int, src: list[int], dst: list[int], ready) -> None:
        if ready is not None:
            ready.synchronize()
        if conn.path == cuda_ipc.PATH:
            self.send_layer_ipc(conn, tx, layer, src, dst)
        else:
            self.send_layer(conn, tx, layer, src, dst)

    def send_layer_ipc(self, conn: Connection, tx: Tx, layer: int, src: list[int], dst: list[int]) -> None:
        """Copy the runs device to device into the receiver's mapped cache, then NOTIFY (cuda_ipc.py)."""
        if self._ipc_copier is None:
            self._ipc_copier = cuda_ipc.IpcCopier(self.layers[0].device)
        self._ipc_copier.copy(conn.plane[layer], self.layers[layer], pair_runs(src, dst))
        frame = wire.Frame(wire.NOTIFY, tx.transfer_id, layer, dst, 0, 0, 0)
        conn.sock.sendall(wire.encode_header(frame))
        tx.num_frames += 1
        tx.num_bytes += len(src) * self.block_bytes

    def open_cuda_ipc(self, conn: Connection) -> bool:
        """Use the receiver's CUDA cache directly when HELLO_OK offered it and nothing needs host copies."""
        if not (self.layers[0].is_cuda and self.config.allow_shm) or self.config.checksum:
            return False
        if self.fault_injector is not None:
            return False
        layers = cuda_ipc.open_layers(conn.welcome, self.layers)
        if layers is None:
            return False
        conn.plane, conn.path = layers, cuda_ipc.PATH
        return True

    def payload(self, view: torch.Tensor) -> torch.Tensor:
        """The tensor actually sent for a source view (the view itself, unless a test corrupts it)."""
        return view if self.fault_injector is None else self.fault_injector(view)

    def checksum(self, views: list[torch.Tensor]) -> tuple[int, int]:
        """(crc, flags) for a frame over ``views``."""
        if not self.config.checksum:
            return 0, 0
        return wire.crc32(host_view(v) for v in views), wire.F_CHECKSUM

    # ---- backend hooks -----------------------------------------------------------------------------
    def connect(self, host: str, port: int):
        sock = socket.create_connection((host, port), timeout=self.config.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def on_connected(self, conn: Connection) -> None:
        """Set up the connection's data plane from the receiver's HELLO_OK (``conn.welcome``)."""
        self.open_cuda_ipc(conn)

    def on_disconnected(self, conn: Connection) -> None:
        """Tear down what ``on_connected`` set up."""

    def send_layer(self, conn: Connection, tx: Tx, layer: int, src: list[int], dst: list[int]) -> None:
        """One DATA frame for the whole push, its payload streamed from the source run views."""
        views = run_views(self.layers[layer], src)
        crc, flags = self.checksum(views)
        nbytes = len(src) * self.block_bytes
        frame = wire.Frame(wire.DATA, tx.transfer_id, layer, dst, nbytes, crc, flags)
        conn.sock.sendall(wire.encode_header(frame))
        for v in views:
            self.send_stream(conn, self.payload(v))
        tx.num_frames += 1
        tx.num_bytes += nbytes

    def send_stream(self, conn: Connection, t: torch.Tensor) -> None:
        """Write a contiguous tensor's bytes to the socket: straight from host memory, or through a reused
        pinned buffer for CUDA tensors."""
        if not t.is_cuda:
            conn.sock.sendall(byte_view(t))
            return
        if conn.staging is None:
            conn.staging = staging_buffer()
        for part in byte_chunks(t):
            host = conn.staging[: part.numel()]
            host.copy_(part)
            conn.sock.sendall(byte_view(host))

    def send_run_frames(self, conn: Connection, tx: Tx, layer: int, src: list[int], dst: list[int],
                        put: Callable[[Connection, torch.Tensor], None]) -> None:
        """For out-of-band data planes: one DATA header per run consecutive on both sides, then ``put``
        sends that run's source view on the plane (the receiver posts its receive into the destination)."""
        src_layer = self.layers[layer]
        for s, d, n in pair_runs(src, dst):
            view = src_layer[s : s + n]
            crc, flags = self.checksum([view])
            frame = wire.Frame(wire.DATA, tx.transfer_id, layer, list(range(d, d + n)), n * self.block_bytes,
                               crc, flags)
            conn.sock.sendall(wire.encode_header(frame))
            put(conn, self.payload(view))
            tx.num_frames += 1
            tx.num_bytes += n * self.block_bytes
