"""TCP backend: control and data over one socket per (sender, receiver) pair, plus a same-host fast path.

Data planes (chosen per connection in the handshake):
- ``tcp``: payload bytes follow each DATA frame; the receiver reads them straight into the destination
  block views (no staging buffer on CPU).
- ``shm``: when both ends are on one host and the receiver's cache lives in a /dev/shm file, the sender
  maps that file and copies blocks in directly; only small NOTIFY frames cross the socket. This is the host
  analogue of CUDA IPC. Trust: the sender can write anywhere in the mapped cache, so only authenticated
  peers on the same machine get this path; the receiver still validates every NOTIFY against its
  reservation and checks checksums when enabled.
Subclasses (the NCCL backend) swap the data plane and keep the control plane.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.kv_cache import block_runs
from kvtransfer import control, wire
from kvtransfer.base import (
    ChecksumError,
    KVReceiver,
    KVSender,
    TransferError,
    TransferHandle,
    TransferStats,
    TransferTimeoutError,
)

logger = logging.getLogger(__name__)


def readable(sock, timeout: float) -> bool:
    if hasattr(sock, "readable"):
        return sock.readable(timeout)
    try:
        r, _, _ = select.select([sock], [], [], timeout)
    except (OSError, ValueError):
        raise ConnectionError("socket closed") from None
    return bool(r)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def pair_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, n) runs where both sides are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


# ================================================================= receiver
@dataclass(slots=True)
class _Rx:
    block_ids: set[int]
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    checksum_failed: bool = False
    num_frames: int = 0
    num_bytes: int = 0
    t0: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    path: str = ""


class SocketReceiver(KVReceiver):
    scheme = "tcp"
    data_path = "tcp"

    def __init__(self, layers, fingerprint, config, shm_path=None):
        super().__init__(layers, fingerprint, config, shm_path)
        self._lock = threading.Lock()
        self._rx: dict[str, _Rx] = {}
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self.block_bytes = fingerprint.block_bytes()

    # ---- KVReceiver --------------------------------------------------------------------------------
    def start(self) -> str:
        ls = socket.create_server((self.config.host, self.config.port), reuse_port=False)
        ls.settimeout(0.2)
        self._listener = ls
        threading.Thread(target=self._accept_loop, name=f"kv-{self.scheme}-accept", daemon=True).start()
        host, port = ls.getsockname()[:2]
        return f"{self.scheme}://{host}:{port}"

    def expect(self, transfer_id: str, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.layers[0].shape[0]]
        if bad:
            raise ValueError(f"block_ids: {bad[0]} is outside the cache")
        with self._lock:
            self._rx[transfer_id] = _Rx(set(block_ids))

    def wait(self, transfer_id: str, timeout: float | None = None) -> TransferStats:
        with self._lock:
            rx = self._rx.get(transfer_id)
        if rx is None:
            raise TransferError(f"transfer {transfer_id!r} is not expected here")
        if not rx.done.wait(self.config.timeout_s if timeout is None else timeout):
            raise TransferTimeoutError(f"transfer {transfer_id!r}: KV did not arrive in time")
        with self._lock:
            self._rx.pop(transfer_id, None)
        if rx.error:
            raise (ChecksumError if rx.checksum_failed else TransferError)(f"transfer {transfer_id!r}: {rx.error}")
        return TransferStats(transfer_id, rx.num_bytes, rx.num_frames, rx.seconds, rx.path)

    def cancel(self, transfer_id: str) -> None:
        with self._lock:
            rx = self._rx.pop(transfer_id, None)
        if rx is not None and not rx.done.is_set():
            rx.error = "cancelled"
            rx.done.set()

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- connections -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name=f"kv-{self.scheme}-rx", daemon=True).start()

    def challenge_extra(self) -> dict:
        extra = {"num_blocks": int(self.layers[0].shape[0])}
        if self.shm_path and self.config.allow_shm:
            extra["shm_path"] = self.shm_path
        return extra

    def on_connected(self, sock: socket.socket, hello: dict) -> None:
        """Hook: set up another data plane once the handshake succeeded (the HELLO_OK is sent)."""

    def _serve(self, sock: socket.socket) -> None:
        self._conns.add(sock)
        touched: set[str] = set()
        try:
            sock.settimeout(self.config.timeout_s)
            extra = self.challenge_extra()
            hello = control.server_handshake(sock, self.fingerprint, self.config.secret, extra)
            control.send_json(sock, wire.HELLO_OK, {})
            self.on_connected(sock, {**hello, **extra})
            while not self._closed.is_set():
                if not readable(sock, 0.5):
                    continue  # idle is fine; a stall inside a frame times out below
                frame = wire.read_frame(sock)
                touched.add(frame.transfer_id)
                self._handle(sock, frame)
        except (ConnectionError, OSError, wire.WireError, TransferError) as e:
            if not self._closed.is_set():
                logger.info("KV connection closed: %s", e)
            self._fail(touched, f"connection lost: {e}")
        finally:
            self._conns.discard(sock)
            self.on_disconnected(sock)
            try:
                sock.close()
            except OSError:
                pass

    def on_disconnected(self, sock: socket.socket) -> None:
        """Hook: tear down what on_connected set up."""

    def _fail(self, transfer_ids, reason: str) -> None:
        with self._lock:
            for tid in transfer_ids:
                rx = self._rx.get(tid)
                if rx is not None and not rx.done.is_set():
                    rx.error = reason
                    rx.done.set()

    def _lookup(self, frame: wire.Frame) -> _Rx | None:
        """The live transfer a data frame may write to, or None (and the frame's data is dropped)."""
        with self._lock:
            rx = self._rx.get(frame.transfer_id)
        if rx is None or rx.done.is_set():
            return None
        if not 0 <= frame.layer < len(self.layers):
            rx.error = f"layer {frame.layer} out of range"
            return None
        if not set(frame.block_ids) <= rx.block_ids:
            rx.error = "frame names blocks outside the reservation"
            return None
        return rx

    def _handle(self, sock: socket.socket, frame: wire.Frame) -> None:
        if frame.type == wire.DATA:
            rx = self._lookup(frame)
            if rx is not None and frame.payload_len != len(frame.block_ids) * self.block_bytes:
                rx.error = f"payload of {frame.payload_len} bytes for {len(frame.block_ids)} blocks"
                rx = None
            if rx is None:
                self.drop_payload(sock, frame)
                return
            self.receive_payload(sock, frame)
            self._account(rx, frame, self.data_path)
        elif frame.type == wire.NOTIFY:
            rx = self._lookup(frame)
            if rx is not None:
                self._account(rx, frame, "shm")
        elif frame.type == wire.DONE:
            body = control.read_json(sock, frame)
            self._finish(sock, frame.transfer_id, body)
        elif frame.type == wire.ABORT:
            control.read_json(sock, frame)
            self._fail([frame.transfer_id], "aborted by the sender")
        else:
            raise wire.WireError(f"unexpected frame type {frame.type}")

    def receive_payload(self, sock: socket.socket, frame: wire.Frame) -> None:
        layer = self.layers[frame.layer]
        for start, n in block_runs(frame.block_ids):
            dst = layer[start : start + n]
            if dst.is_cuda:
                host = torch.empty(dst.shape, dtype=dst.dtype, pin_memory=torch.cuda.is_available())
                wire.recv_into_exact(sock, byte_view(host))
                dst.copy_(host, non_blocking=False)
            else:
                wire.recv_into_exact(sock, byte_view(dst))

    def drop_payload(self, sock: socket.socket, frame: wire.Frame) -> None:
        wire.discard(sock, frame.payload_len)

    def _account(self, rx: _Rx, frame: wire.Frame, path: str) -> None:
        if frame.flags & wire.F_CHECKSUM:
            layer = self.layers[frame.layer]
            views = [byte_view(layer[s : s + n].cpu() if layer.is_cuda else layer[s : s + n])
                     for s, n in block_runs(frame.block_ids)]
            if wire.crc32(views) != frame.crc:
                rx.error = f"checksum mismatch in layer {frame.layer}"
                rx.checksum_failed = True
        rx.num_frames += 1
        rx.num_bytes += len(frame.block_ids) * self.block_bytes
        rx.path = path

    def _finish(self, sock: socket.socket, tid: str, body: dict) -> None:
        with self._lock:
            rx = self._rx.get(tid)
        if rx is None:
            ack = {"ok": False, "error": "unknown or cancelled transfer"}
        else:
            if rx.error is None and body.get("frames") != rx.num_frames:
                rx.error = f"sender sent {body.get('frames')} frames, {rx.num_frames} arrived"
            rx.seconds = time.monotonic() - rx.t0
            ack = {"ok": rx.error is None, "error": rx.error, "checksum": rx.checksum_failed}
            rx.done.set()
        control.send_json(sock, wire.ACK, ack, transfer_id=tid)


# ================================================================= sender
@dataclass(slots=True)
class _Tx:
    transfer_id: str
    dst_block_ids: list[int]
    conn: _Conn
    acked: threading.Event = field(default_factory=threading.Event)
    ack: dict | None = None
    error: str | None = None
    num_frames: int = 0
    num_bytes: int = 0
    t0: float = field(default_factory=time.monotonic)


class _Conn:
    """One connection to a receiver: a writer thread draining a queue, a reader thread for ACKs."""

    def __init__(self, sender: SocketSender, endpoint: str):
        self.sender = sender
        self.endpoint = endpoint
        host, port = control.parse_endpoint(endpoint, sender.scheme)
        cfg = sender.config
        try:
            self.sock = sender.connect(host, port)
        except OSError as e:
            raise TransferError(f"cannot connect to KV receiver {endpoint}: {e}") from None
        try:
            self.challenge, self.hello_ok = control.client_handshake(self.sock, sender.fingerprint, cfg.secret)
        except (OSError, ConnectionError, wire.WireError) as e:
            self.sock.close()
            raise TransferError(f"KV handshake with {endpoint} failed: {e}") from None
        except TransferError:
            self.sock.close()
            raise
        self.sock.settimeout(cfg.timeout_s)
        self.shm_layers = sender.map_shm(self.challenge)
        self.path = "shm" if self.shm_layers is not None else sender.scheme
        sender.on_connected(self)
        self.pending: dict[str, _Tx] = {}
        self.lock = threading.Lock()
        self.dead: str | None = None
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._writer, name="kv-tx", daemon=True).start()
        threading.Thread(target=self._reader, name="kv-tx-ack", daemon=True).start()

    def _die(self, reason: str) -> None:
        with self.lock:
            if self.dead is None:
                self.dead = reason
            pending = list(self.pending.values())
            self.pending.clear()
        for tx in pending:
            tx.error = tx.error or reason
            tx.acked.set()
        self.sender.forget(self)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _writer(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            kind, tx = item[0], item[1]
            try:
                if kind == "data" and tx.error is None:
                    self.sender.send_layer(self, tx, *item[2:])
                elif kind == "done":
                    control.send_json(self.sock, wire.DONE, {"frames": tx.num_frames}, tx.transfer_id)
                elif kind == "abort":
                    control.send_json(self.sock, wire.ABORT, {"reason": item[2]}, tx.transfer_id)
            except (OSError, ConnectionError, TransferError) as e:
                self._die(f"send to {self.endpoint} failed: {e}")
                return

    def _reader(self) -> None:
        try:
            while self.dead is None:
                if not readable(self.sock, 0.5):
                    continue
                frame = wire.read_frame(self.sock)
                body = control.read_json(self.sock, frame)
                if frame.type != wire.ACK:
                    raise wire.WireError(f"unexpected frame type {frame.type} from receiver")
                with self.lock:
                    tx = self.pending.pop(frame.transfer_id, None)
                if tx is not None:
                    tx.ack = body
                    tx.acked.set()
        except (OSError, ConnectionError, wire.WireError) as e:
            self._die(f"connection to {self.endpoint} lost: {e}")

    def close(self) -> None:
        self.q.put(None)
        try:
            self.sock.close()
        except OSError:
            pass


class _Handle(TransferHandle):
    def __init__(self, tx: _Tx):
        self.tx = tx

    def push_layer(self, layer_idx, src_block_ids, dst_block_ids, ready=None) -> None:
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError("push_layer: src and dst block lists differ in length")
        if not set(dst_block_ids) <= set(self.tx.dst_block_ids):
            raise ValueError("push_layer: destination blocks outside this transfer")
        if src_block_ids:
            self.tx.conn.q.put(("data", self.tx, layer_idx, list(src_block_ids), list(dst_block_ids), ready))

    def finish(self, timeout: float | None = None) -> TransferStats:
        conn = self.tx.conn
        if conn.dead:
            raise TransferError(conn.dead)
        conn.q.put(("done", self.tx))
        if not self.tx.acked.wait(conn.sender.config.timeout_s if timeout is None else timeout):
            raise TransferTimeoutError(f"transfer {self.tx.transfer_id!r}: no acknowledgement from {conn.endpoint}")
        if self.tx.error:
            raise TransferError(self.tx.error)
        ack = self.tx.ack or {}
        if not ack.get("ok"):
            cls = ChecksumError if ack.get("checksum") else TransferError
            raise cls(f"transfer {self.tx.transfer_id!r} refused by the receiver: {ack.get('error')}")
        return TransferStats(self.tx.transfer_id, self.tx.num_bytes, self.tx.num_frames,
                             time.monotonic() - self.tx.t0, conn.path)

    def abort(self, reason: str = "") -> None:
        with self.tx.conn.lock:
            self.tx.conn.pending.pop(self.tx.transfer_id, None)
        self.tx.error = self.tx.error or f"aborted: {reason}"
        self.tx.conn.q.put(("abort", self.tx, reason))


class SocketSender(KVSender):
    scheme = "tcp"

    def __init__(self, layers, fingerprint, config):
        super().__init__(layers, fingerprint, config)
        self._conns: dict[str, _Conn] = {}
        self._lock = threading.Lock()
        self.block_bytes = fingerprint.block_bytes()
        self.fault_injector = None  # tests: callable(bytes) -> bytes applied to DATA payloads

    def open(self, transfer_id: str, endpoint: str, dst_block_ids: list[int]) -> TransferHandle:
        with self._lock:
            conn = self._conns.get(endpoint)
        if conn is None or conn.dead:
            conn = _Conn(self, endpoint)
            with self._lock:
                self._conns[endpoint] = conn
        tx = _Tx(transfer_id, list(dst_block_ids), conn)
        with conn.lock:
            if conn.dead:
                raise TransferError(conn.dead)
            conn.pending[transfer_id] = tx
        return _Handle(tx)

    def connect(self, host: str, port: int):
        sock = socket.create_connection((host, port), timeout=self.config.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def forget(self, conn: _Conn) -> None:
        with self._lock:
            if self._conns.get(conn.endpoint) is conn:
                del self._conns[conn.endpoint]

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()

    # ---- data planes -------------------------------------------------------------------------------
    def map_shm(self, challenge: dict) -> list[torch.Tensor] | None:
        path = challenge.get("shm_path")
        if not (path and self.config.allow_shm and challenge.get("host_id") == control.host_id()):
            return None
        if self.layers[0].is_cuda or not os.path.exists(path):
            return None
        num_blocks = int(challenge["num_blocks"])
        block_shape = tuple(self.layers[0].shape[1:])
        per_layer = num_blocks
        for d in block_shape:
            per_layer *= d
        total = per_layer * len(self.layers)
        if os.path.getsize(path) != total * self.layers[0].element_size():
            return None
        flat = torch.from_file(path, shared=True, size=total, dtype=self.layers[0].dtype)
        return [flat[i * per_layer : (i + 1) * per_layer].view(num_blocks, *block_shape) for i in range(len(self.layers))]

    def on_connected(self, conn: _Conn) -> None:
        """Hook for subclasses (set up another data plane)."""

    def send_layer(self, conn: _Conn, tx: _Tx, layer: int, src: list[int], dst: list[int], ready) -> None:
        if ready is not None:
            ready.synchronize()
        src_layer = self.layers[layer]
        checksum = self.config.checksum
        if conn.shm_layers is not None:
            dst_layer = conn.shm_layers[layer]
            for s, d, n in pair_runs(src, dst):
                dst_layer[d : d + n].copy_(src_layer[s : s + n])
            crc = 0
            if checksum:
                crc = wire.crc32(byte_view(dst_layer[s : s + n]) for s, n in block_runs(dst))
            frame = wire.Frame(wire.NOTIFY, tx.transfer_id, layer, dst, 0, crc, wire.F_CHECKSUM if checksum else 0)
            conn.sock.sendall(wire.encode_header(frame))
            tx.num_frames += 1
        else:
            self.send_data(conn, tx, layer, src, dst)
        tx.num_bytes += len(src) * self.block_bytes

    def send_data(self, conn: _Conn, tx: _Tx, layer: int, src: list[int], dst: list[int]) -> None:
        """Stream the blocks as one DATA frame (payload straight from the source views)."""
        src_layer = self.layers[layer]
        views = [src_layer[s : s + n] for s, n in block_runs(src)]
        views = [byte_view(v.cpu() if v.is_cuda else v) for v in views]
        checksum = self.config.checksum
        crc = wire.crc32(views) if checksum else 0
        nbytes = len(src) * self.block_bytes
        frame = wire.Frame(wire.DATA, tx.transfer_id, layer, dst, nbytes, crc, wire.F_CHECKSUM if checksum else 0)
        self.send_payload(conn, frame, views)
        tx.num_frames += 1

    def send_payload(self, conn: _Conn, frame: wire.Frame, views: list[memoryview]) -> None:
        if self.fault_injector is not None:
            views = [memoryview(self.fault_injector(b"".join(bytes(v) for v in views)))]
        conn.sock.sendall(wire.encode_header(frame))
        for v in views:
            conn.sock.sendall(v)

