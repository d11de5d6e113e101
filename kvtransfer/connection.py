"""One sender's connection to a receiver: a writer thread drains its queue, a reader thread collects ACKs.

The connection is opened once per endpoint (handshake: layout fingerprint, mutual auth) and reused by every
transfer to it; losing it hands every transfer in flight on it to the sender's ``Resender`` (resend.py), which
re-sends them on a new connection or fails them. The sender (``sender.SocketSender``) does
the actual sending on the writer thread (``push``) through its backend hooks.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdserve.kvtransfer import control, wire
from pdserve.kvtransfer.base import TransferError

if TYPE_CHECKING:
    from pdserve.kvtransfer.sender import SocketSender

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
CLOSE_JOIN_S = 3.0


@dataclass(slots=True, eq=False)
class Tx:
    """One transfer in flight on a connection."""

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
    traceparent: str = ""
    # what was pushed, in order (kind "data" items), so a resend can replay it; guarded by ``lock`` with
    # ``conn``, ``finished`` and ``error`` against the resend moving the transfer to a new connection
    log: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    resends: int = 0
    resend_deadline: float | None = None

    def submit(self, item: tuple) -> None:
        """Log a push and queue it on the current connection (call with ``lock`` held). On a dead one it is
        only logged: the resend replays it, or the transfer fails."""
        if item[0] == "data":
            self.log.append(item)
        if self.conn.dead is None:
            self.conn.q.put(item)


class Connection:
    """One authenticated connection to a receiver: a writer thread draining a queue, a reader for ACKs."""

    def __init__(self, sender: SocketSender, endpoint: str):
        self.sender = sender
        self.endpoint = endpoint
        self.path = sender.scheme
        self.plane: object | None = None  # backend data plane (shm mapping, process group, ...)
        self.staging: torch.Tensor | None = None  # pinned host buffer, for CUDA caches on the socket plane
        self.pending: dict[str, Tx] = {}
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

    def add(self, tx: Tx) -> None:
        with self.lock:
            if self.dead:
                raise TransferError(self.dead)
            if tx.transfer_id in self.pending:
                raise ValueError(f"transfer_id: {tx.transfer_id!r} is already in flight to {self.endpoint}")
            self.pending[tx.transfer_id] = tx

    def discard(self, tx: Tx) -> None:
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
        self.sender.forget(self)
        self.sender.resender.lost(self, pending, reason)
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
                if tx.conn is not self:
                    continue  # re-sent on another connection since
                if kind == "begin":
                    tx.num_frames = tx.num_bytes = 0  # what DONE reports: the frames sent on this connection
                    body = {"blocks": len(tx.dst_block_ids)}
                    if tx.resends:
                        body["resend"] = tx.resends
                    if tx.traceparent:
                        body["traceparent"] = tx.traceparent
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

    def _inject_cut(self, tx: Tx, layer: int) -> None:
        """Fault injection: write half a DATA header, then cut the connection (the receiver sees a frame
        truncated midway, as when a link or peer dies mid-transfer)."""
        header = wire.encode_header(wire.Frame(wire.DATA, tx.transfer_id, layer, [], 0, 0, 0))
        self.sock.sendall(header[: len(header) // 2])
        self.sock.shutdown(socket.SHUT_RDWR)
        tx.cut = False  # once: the resend goes through
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
