"""The sending half shared by every backend: connections, the per-connection writer thread, handles.

``push_layer`` only validates and enqueues; the connection's writer thread waits on the layer's ``ready``
event, then sends (so the forward pass keeps computing), and a reader thread collects the receiver's
ACKs. A connection to an endpoint is opened once (handshake: layout fingerprint, mutual auth) and reused by
every transfer to it; losing it fails every transfer in flight on it.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.kvtransfer import control, cuda_ipc, wire
from pdserve.kvtransfer.base import (
    ChecksumError,
    KVSender,
    TransferError,
    TransferHandle,
    TransferStats,
    TransferTimeoutError,
)
from pdserve.kvtransfer.views import byte_chunks, byte_view, host_view, pair_runs, run_views, staging_buffer

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
CLOSE_JOIN_S = 3.0


@dataclass(slots=True, eq=False)
class _Tx:
    transfer_id: str
    dst_block_ids: frozenset[int]
    conn: Connection
    acked: threading.Event = field(default_factory=threading.Event)
    ack: dict | None = None
    error: str | None = None
    finished: bool = False
    num_frames: int = 0  # written by the writer thread only
    num_bytes: int = 0
    cut: bool = False  # fault injection: this transfer's connection is cut midway
    t0: float = field(default_factory=time.monotonic)


class Connection:
    """One authenticated connection to a receiver: a writer thread draining a queue, a reader for ACKs."""

    def __init__(self, sender: SocketSender, endpoint: str):
        self.sender = sender
        self.endpoint = endpoint
        self.path = sender.scheme
        self.plane: object | None = None  # backend data plane (shm mapping, process group, ...)
        self.staging: torch.Tensor | None = None  # pinned host buffer, for CUDA caches on the socket plane
        self.pending: dict[str, _Tx] = {}
        self.lock = threading.Lock()
        self.dead: str | None = None
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.sock, self.welcome = control.dial(sender.connect, endpoint, sender.scheme, sender.fingerprint,
                                               sender.config)
        try:
            sender.on_connected(self)
        except (OSError, ConnectionError, wire.WireError, RuntimeError) as e:  # RuntimeError: torch.distributed
            self.sock.close()
            raise TransferError(f"KV handshake with {endpoint} failed: {e}") from None
        except TransferError:
            self.sock.close()
            raise
        self.threads = [threading.Thread(target=self._writer, name="kv-tx", daemon=True),
                        threading.Thread(target=self._reader, name="kv-tx-ack", daemon=True)]
        for th in self.threads:
            th.start()

    def add(self, tx: _Tx) -> None:
        with self.lock:
            if self.dead:
                raise TransferError(self.dead)
            if tx.transfer_id in self.pending:
                raise ValueError(f"transfer_id: {tx.transfer_id!r} is already in flight to {self.endpoint}")
            self.pending[tx.transfer_id] = tx

    def discard(self, tx: _Tx) -> None:
        with self.lock:
            if self.pending.get(tx.transfer_id) is tx:
                del self.pending[tx.transfer_id]

    def submit(self, item: tuple) -> None:
        if self.dead:
            raise TransferError(self.dead)
        self.q.put(item)

    def die(self, reason: str) -> None:
        with self.lock:
            if self.dead is not None:
                return
            self.dead = reason
            pending = list(self.pending.values())
            self.pending.clear()
        logger.info("KV connection to %s: %s", self.endpoint, reason)
        for tx in pending:
            tx.error = tx.error or reason
            tx.acked.set()
        self.sender.forget(self)
        self.sender.on_disconnected(self)
        self.q.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _writer(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            kind, tx, *args = item
            try:
                if kind == "begin":
                    body = {"blocks": len(tx.dst_block_ids)}
                    control.send_json(self.sock, wire.BEGIN, body, tx.transfer_id)
                elif kind == "data" and tx.error is None:
                    if tx.cut and args[0] >= len(self.sender.layers) // 2:
                        self._inject_cut(tx, args[0])
                    self.sender.push(self, tx, *args)
                elif kind == "done":
                    body = {"frames": tx.num_frames, "bytes": tx.num_bytes}
                    control.send_json(self.sock, wire.DONE, body, tx.transfer_id)
                elif kind == "abort":
                    control.send_json(self.sock, wire.ABORT, {"reason": args[0]}, tx.transfer_id)
            except (OSError, ConnectionError, wire.WireError, TransferError) as e:
                self.die(f"send to {self.endpoint} failed: {e}")
                return
            except Exception as e:  # noqa: BLE001 - a bug (or a failed ready event) must not strand finish()
                logger.exception("KV writer to %s crashed", self.endpoint)
                self.die(f"sender error: {e}")
                return

    def _inject_cut(self, tx: _Tx, layer: int) -> None:
        """Fault injection: write half a DATA header, then cut the connection (the receiver sees a frame
        truncated midway, as when a link or peer dies mid-transfer)."""
        header = wire.encode_header(wire.Frame(wire.DATA, tx.transfer_id, layer, [], 0, 0, 0))
        self.sock.sendall(header[: len(header) // 2])
        self.sock.shutdown(socket.SHUT_RDWR)
        raise OSError(f"injected cut of the KV connection mid-transfer {tx.transfer_id!r}")

    def _reader(self) -> None:
        try:
            while self.dead is None:
                if not control.readable(self.sock, IDLE_POLL_S):
                    continue
                frame = wire.read_frame(self.sock)
                body = control.read_json(self.sock, frame)
                if frame.type != wire.ACK:
                    raise wire.WireError(f"unexpected frame type {frame.type} from a receiver")
                with self.lock:
                    tx = self.pending.pop(frame.transfer_id, None)
                if tx is not None:
                    tx.ack = body
                    tx.acked.set()
        except (OSError, ConnectionError, wire.WireError) as e:
            self.die(f"connection to {self.endpoint} lost: {e}")

    def alive(self) -> bool:
        return any(th.is_alive() for th in self.threads)

    def close(self) -> None:
        self.die("sender closed")
        for th in self.threads:  # bounded: the socket is shut down, so neither thread can block long
            if th is not threading.current_thread():
                th.join(CLOSE_JOIN_S)
        try:
            self.sock.close()
        except OSError:
            pass


class _Handle(TransferHandle):
    def __init__(self, tx: _Tx, sender: SocketSender):
        self.tx = tx
        self.sender = sender

    def push_layer(self, layer_idx, src_block_ids, dst_block_ids, ready=None) -> None:
        tx = self.tx
        if tx.finished or tx.error:
            raise TransferError(tx.error or f"transfer {tx.transfer_id!r} already finished")
        src, dst = list(src_block_ids), list(dst_block_ids)
        self.sender.check_push(layer_idx, src, dst)
        if not tx.dst_block_ids.issuperset(dst):
            raise ValueError(f"dst_block_ids: blocks outside transfer {tx.transfer_id!r}")
        if src:
            tx.conn.submit(("data", tx, layer_idx, src, dst, ready))

    def finish(self, timeout: float | None = None) -> TransferStats:
        tx, conn = self.tx, self.tx.conn
        if tx.error:
            raise TransferError(tx.error)
        if not tx.finished:
            tx.finished = True
            conn.submit(("done", tx))
        if not tx.acked.wait(self.sender.config.timeout_s if timeout is None else timeout):
            conn.discard(tx)
            tx.error = f"transfer {tx.transfer_id!r}: no acknowledgement from {conn.endpoint} in time"
            raise TransferTimeoutError(tx.error)
        if tx.error:
            raise TransferError(tx.error)
        ack = tx.ack or {}
        if not ack.get("ok"):
            cls = ChecksumError if ack.get("checksum") else TransferError
            raise cls(f"transfer {tx.transfer_id!r} refused by the receiver: {ack.get('error')}")
        return TransferStats(tx.transfer_id, tx.num_bytes, tx.num_frames, time.monotonic() - tx.t0, conn.path)

    def abort(self, reason: str = "") -> None:
        tx, conn = self.tx, self.tx.conn
        conn.discard(tx)
        already_failed = tx.error is not None
        tx.error = tx.error or f"aborted: {reason}"
        tx.acked.set()
        if not already_failed and not conn.dead:
            conn.q.put(("abort", tx, reason))


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

    def open(self, transfer_id: str, endpoint: str, dst_block_ids: list[int]) -> TransferHandle:
        conn = self._connection(endpoint)
        tx = _Tx(transfer_id, frozenset(dst_block_ids), conn)
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
    def push(self, conn: Connection, tx: _Tx, layer: int, src: list[int], dst: list[int], ready) -> None:
        if ready is not None:
            ready.synchronize()
        if conn.path == cuda_ipc.PATH:
            self.send_layer_ipc(conn, tx, layer, src, dst)
        else:
            self.send_layer(conn, tx, layer, src, dst)

    def send_layer_ipc(self, conn: Connection, tx: _Tx, layer: int, src: list[int], dst: list[int]) -> None:
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

    def send_layer(self, conn: Connection, tx: _Tx, layer: int, src: list[int], dst: list[int]) -> None:
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

    def send_run_frames(self, conn: Connection, tx: _Tx, layer: int, src: list[int], dst: list[int],
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
