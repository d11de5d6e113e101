"""The receiving half shared by every backend: accept loop, reservations, frame checks, acknowledgements.

One thread per connection ("link") reads control frames in order and hands DATA payloads to the backend's
data plane (``receive_payload``), which writes them straight into the reserved cache views. Nothing is
written unless the frame names a live transfer, a layer in range and only blocks reserved for it by
``expect``; anything else is drained and dropped, and a known transfer is marked failed. A frame that
breaks the protocol (bad header, wrong payload size, NOTIFY where no shared memory was offered) drops the
connection, which fails every transfer that was using it.

Until its peer authenticates (``control``: channel-bound to one of this receiver's ``names``), a
connection holds a slot of the pending-handshake budget and runs under the handshake deadline
(``admission``), and no thread of its own: the socket receivers' ``doorman`` runs every handshake up to a
verified HELLO; a backend that gets its connections elsewhere (ucx) calls ``serve``, which runs it on the
connection's thread under the same budget and deadline. Only then does it count as a link (at most
``MAX_LINKS``, each a thread).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from pdserve.kvtransfer import control, cuda_ipc, names, wire
from pdserve.kvtransfer.admission import HandshakeBudget, HandshakeStream
from pdserve.kvtransfer.base import (
    ChecksumError,
    KVReceiver,
    TransferAuthError,
    TransferError,
    TransferStats,
    TransferTimeoutError,
)
from pdserve.kvtransfer.doorman import Doorman
from pdserve.kvtransfer.views import byte_chunks, byte_view, host_view, run_views, staging_buffer

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
CLOSE_JOIN_S = 3.0
MAX_LINKS = 256  # authenticated links (each a thread)
BACKLOG = 1024
WARN_EVERY_S = 10.0


@dataclass(slots=True)
class _Rx:
    """One expected transfer."""

    block_ids: frozenset[int]
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    checksum_failed: bool = False
    num_frames: int = 0
    num_bytes: int = 0
    t0: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    path: str = ""


@dataclass(slots=True, eq=False)
class Link:
    """One accepted, authenticated connection and the data plane the backend set up for it."""

    sock: object
    peer: str
    shm: bool = False  # the sender was offered our cache to write into directly (NOTIFY frames allowed)
    notify_path: str = "shm"  # that direct path's name: "shm" (host file) or "cuda_ipc"
    plane: object | None = None  # backend data plane (a process group, ...)
    staging: torch.Tensor | None = None  # pinned host buffer, for CUDA caches on the socket data plane
    transfer_ids: set[str] = field(default_factory=set)
    authenticated: bool = False


class SocketReceiver(KVReceiver):
    """A receiver whose control plane is a byte stream; DATA payloads follow their header in-band unless a
    subclass overrides ``receive_payload``/``drop_payload``."""

    scheme = "tcp"
    data_path = "tcp"

    def __init__(self, layers, fingerprint, config, shm_path=None):
        super().__init__(layers, fingerprint, config, shm_path)
        if len(layers) != fingerprint.num_layers:
            raise ValueError(
                f"layers: {len(layers)} tensors for a {fingerprint.num_layers}-layer fingerprint"
            )
        self.num_blocks = int(layers[0].shape[0])
        self.block_bytes = fingerprint.block_bytes()
        self._lock = threading.Lock()
        self._rx: dict[str, _Rx] = {}
        self._links: set[Link] = set()
        self._serving: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closed = threading.Event()
        self._budget = HandshakeBudget(config.max_pending, config.max_pending_per_source)
        self._names = names.ReceiverNames(self.scheme, config.advertise_host)
        self._auth_warned_at = 0.0

    # ---- KVReceiver --------------------------------------------------------------------------------
    def start(self) -> str:
        ls = socket.create_server((self.config.host, self.config.port), backlog=BACKLOG)
        ls.settimeout(IDLE_POLL_S)
        self._listener = ls
        doorman = Doorman(ls, self._budget, self.config.handshake_timeout_s, self._check_hello, self._admit,
                          self._refused, self._closed)
        self._acceptor = threading.Thread(target=doorman.run, name=f"kv-{self.scheme}-accept", daemon=True)
        self._acceptor.start()
        host, port = ls.getsockname()[:2]
        return self.bind_names(host, port)

    def bind_names(self, host: str, port: int) -> str:
        """Record the names senders may dial this receiver by; returns the endpoint to advertise."""
        return self._names.bind(host, port)

    def expect(self, transfer_id: str, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block_ids: {bad[0]} is outside the cache of {self.num_blocks} blocks")
        with self._lock:
            self._rx[transfer_id] = _Rx(frozenset(block_ids))

    def wait(self, transfer_id: str, timeout: float | None = None) -> TransferStats:
        with self._lock:
            rx = self._rx.get(transfer_id)
        if rx is None:
            raise TransferError(f"transfer {transfer_id!r} is not expected here")
        if not rx.done.wait(self.config.timeout_s if timeout is None else timeout):
            raise TransferTimeoutError(f"transfer {transfer_id!r}: KV did not arrive in time")
        with self._lock:
            if self._rx.get(transfer_id) is rx:
                del self._rx[transfer_id]
        if rx.error:
            cls = ChecksumError if rx.checksum_failed else TransferError
            raise cls(f"transfer {transfer_id!r}: {rx.error}")
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
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            links, serving = list(self._links), list(self._serving)
            pending = list(self._rx)
        self._fail(pending, "receiver closed")
        for link in links:
            self.close_link(link)
        deadline = time.monotonic() + CLOSE_JOIN_S
        # Join every thread before returning: a daemon thread still running at interpreter exit (even just
        # dropping the last reference to this receiver's tensors) aborts the process.
        for th in serving:
            if th is not threading.current_thread():
                th.join(max(0.0, deadline - time.monotonic()))
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(IDLE_POLL_S * 2)  # woken by the shutdown above, or by its poll timeout

    # ---- backend hooks -----------------------------------------------------------------------------
    def welcome_extra(self, link: Link, hello: control.Hello) -> dict:
        """Extras for HELLO_OK (only authenticated peers with a matching layout get them)."""
        return self.cuda_ipc_extra(link, hello)

    def cuda_ipc_extra(self, link: Link, hello: control.Hello) -> dict:
        """Offer a same-host sender our CUDA cache through IPC handles (see cuda_ipc.py)."""
        if not (self.layers[0].is_cuda and self.config.allow_shm and hello.host_id == control.host_id()):
            return {}
        extra = cuda_ipc.export_layers(self.layers)
        if extra:
            link.shm, link.notify_path = True, cuda_ipc.PATH
        return extra

    def on_connected(self, link: Link, hello: control.Hello, extra: dict) -> None:
        """Set up the link's data plane once HELLO_OK is sent."""

    def on_disconnected(self, link: Link) -> None:
        """Tear down what ``on_connected`` set up."""

    def check_frame(self, link: Link, frame: wire.Frame) -> None:
        """Backend-specific frame rules; raise WireError to drop the connection."""

    def receive_payload(self, link: Link, frame: wire.Frame) -> None:
        """Write the frame's payload into its destination blocks (checked by the caller)."""
        for dst in run_views(self.layers[frame.layer], frame.block_ids):
            if not dst.is_cuda:
                wire.recv_into_exact(link.sock, byte_view(dst))
                continue
            if link.staging is None:
                link.staging = staging_buffer()
            for part in byte_chunks(dst):  # through a reused pinned buffer, one chunk at a time
                host = link.staging[: part.numel()]
                wire.recv_into_exact(link.sock, byte_view(host))
                part.copy_(host)

    def drop_payload(self, link: Link, frame: wire.Frame) -> None:
        """Consume the frame's payload without writing it anywhere."""
        wire.discard(link.sock, frame.payload_len)

    def close_link(self, link: Link) -> None:
        try:
            link.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- connections -------------------------------------------------------------------------------
    def _check_hello(self, sock, body: dict, nonce: bytes) -> control.Hello:
        return control.check_hello(body, nonce, self.fingerprint, self.config.secret, self._names.of(sock))

    def _admit(self, sock, peer: str, source: str, hello: control.Hello) -> None:
        """Serve a peer the doorman authenticated, on a thread of its own."""
        args = (sock, peer, source, hello)
        threading.Thread(target=self.serve, args=args, name=f"kv-{self.scheme}-rx", daemon=True).start()

    def _refused(self, peer: str, error: TransferError) -> None:
        if isinstance(error, TransferAuthError):
            self._warn_auth(peer, error)
        else:
            logger.info("KV link from %s refused: %s", peer, error)

    def serve(self, sock, peer: str, source: str = "", hello: control.Hello | None = None) -> None:
        """Run one connection to its end (the calling thread owns it): the handshake, unless ``hello`` says
        the doorman did it. ``source``: the peer's address, for the per-source budget ("" if unknown)."""
        link = Link(sock, peer)
        with self._lock:
            self._links.add(link)
            self._serving.add(threading.current_thread())
        try:
            hello = self._authenticate(link, source) if hello is None else self._promote(link, hello)
            extra = self.welcome_extra(link, hello)
            control.welcome(sock, hello, self.fingerprint, self.config.secret, extra)
            self.on_connected(link, hello, extra)
            logger.debug("KV link from %s up (%s)", peer, self.scheme)
            while not self._closed.is_set():
                if control.readable(sock, IDLE_POLL_S):  # idle is fine; a stall inside a frame times out
                    self._handle(link, wire.read_frame(sock))
        except (ConnectionError, OSError, wire.WireError, TransferError) as e:
            if isinstance(e, TransferAuthError):
                self._warn_auth(peer, e)
            elif not self._closed.is_set():
                log = logger.info if link.authenticated else logger.debug  # a flood must not flood the log
                log("KV link from %s closed: %s", peer, e)
            self._fail(link.transfer_ids, f"connection lost: {e}")
        except Exception as e:  # noqa: BLE001 - a bug must fail the transfers, not strand them
            logger.exception("KV link from %s crashed", peer)
            self._fail(link.transfer_ids, f"receiver error: {e}")
        finally:
            with self._lock:
                self._links.discard(link)
            self.on_disconnected(link)
            with self._lock:
                self._serving.discard(threading.current_thread())
            try:
                sock.close()
            except OSError:
                pass

    def _authenticate(self, link: Link, source: str) -> control.Hello:
        """The handshake, in a pending slot and under the handshake deadline; then the link counts."""
        ticket, victims = self._budget.admit(link, source)
        for victim in victims:
            self.close_link(victim.item)
        try:
            stream = HandshakeStream(link.sock, self.config.handshake_timeout_s, ticket)
            hello = control.server_handshake(stream, self.fingerprint, self.config.secret,
                                             self._names.of(link.sock))
        finally:
            kept = self._budget.leave(ticket)
        if not kept:
            raise ConnectionError("dropped from the pending-handshake budget")
        return self._promote(link, hello)

    def _promote(self, link: Link, hello: control.Hello) -> control.Hello:
        """An authenticated peer becomes a link, if fewer than MAX_LINKS are open."""
        with self._lock:
            link.authenticated = sum(lk.authenticated for lk in self._links) < MAX_LINKS
        if not link.authenticated:
            logger.warning("KV receiver: %d links open, refusing an authenticated peer %s", MAX_LINKS, link.peer)
            control.refuse_busy(link.sock, f"KV receiver has {MAX_LINKS} links open")
            raise TransferError(f"{MAX_LINKS} links open, refused an authenticated peer")
        link.sock.settimeout(self.config.timeout_s)
        return hello

    def _warn_auth(self, peer: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._auth_warned_at >= WARN_EVERY_S:  # at most one a period: bad proofs cost nothing to send
            self._auth_warned_at = now
            logger.warning("KV handshake from %s refused: %s", peer, e)
        else:
            logger.debug("KV handshake from %s refused: %s", peer, e)

    def _fail(self, transfer_ids, reason: str) -> None:
        with self._lock:
            for tid in transfer_ids:
                rx = self._rx.get(tid)
                if rx is not None and not rx.done.is_set():
                    rx.error = rx.error or reason
                    rx.done.set()

    def _check(self, link: Link, frame: wire.Frame) -> None:
        """Protocol rules for DATA/NOTIFY frames; a violation drops the connection."""
        n = len(frame.block_ids)
        if not 0 < n <= self.num_blocks:
            raise wire.WireError(f"frame names {n} blocks (cache has {self.num_blocks})")
        expected = n * self.block_bytes if frame.type == wire.DATA else 0
        if frame.payload_len != expected:
            raise wire.WireError(f"payload of {frame.payload_len} bytes for {n} blocks (expected {expected})")
        if frame.type == wire.NOTIFY and not link.shm:
            raise wire.WireError("NOTIFY on a link that was not offered shared memory")
        self.check_frame(link, frame)

    def _target(self, frame: wire.Frame) -> _Rx | None:
        """The live transfer this frame may write into, or None (its payload is dropped)."""
        with self._lock:
            rx = self._rx.get(frame.transfer_id)
        if rx is None or rx.done.is_set() or rx.error:
            return None
        if not 0 <= frame.layer < len(self.layers):
            rx.error = f"layer {frame.layer} out of range"
        elif not rx.block_ids.issuperset(frame.block_ids):
            rx.error = "frame names blocks outside the reservation"
        if rx.error:
            logger.warning("KV transfer %s: refused a frame: %s", frame.transfer_id, rx.error)
            return None
        return rx

    def _handle(self, link: Link, frame: wire.Frame) -> None:
        link.transfer_ids.add(frame.transfer_id)
        if frame.type in (wire.DATA, wire.NOTIFY):
            self._check(link, frame)
            rx = self._target(frame)
            if frame.type == wire.DATA:
                if rx is None:
                    self.drop_payload(link, frame)
                    return
                self.receive_payload(link, frame)
            if rx is not None:
                self._account(rx, frame, self.data_path if frame.type == wire.DATA else link.notify_path)
        elif frame.type == wire.BEGIN:
            control.read_json(link.sock, frame)
        elif frame.type == wire.DONE:
            self._finish(link, frame.transfer_id, control.read_json(link.sock, frame))
        elif frame.type == wire.ABORT:
            body = control.read_json(link.sock, frame)
            self._fail([frame.transfer_id], f"aborted by the sender: {body.get('reason', '')}")
            link.transfer_ids.discard(frame.transfer_id)
        else:
            raise wire.WireError(f"unexpected frame type {frame.type} from a sender")

    def _account(self, rx: _Rx, frame: wire.Frame, path: str) -> None:
        if frame.flags & wire.F_CHECKSUM:
            views = run_views(self.layers[frame.layer], frame.block_ids)
            if wire.crc32(host_view(v) for v in views) != frame.crc:
                rx.error = f"checksum mismatch in layer {frame.layer}"
                rx.checksum_failed = True
                logger.warning("KV transfer %s: %s", frame.transfer_id, rx.error)
        rx.num_frames += 1
        rx.num_bytes += len(frame.block_ids) * self.block_bytes
        rx.path = path

    def _finish(self, link: Link, tid: str, body: dict) -> None:
        with self._lock:
            rx = self._rx.get(tid)
        if rx is None:
            ack = {"ok": False, "error": "unknown or cancelled transfer"}
        else:
            if rx.error is None and (body.get("frames"), body.get("bytes")) != (rx.num_frames, rx.num_bytes):
                rx.error = (f"sender sent {body.get('frames')} frames / {body.get('bytes')} bytes, "
                            f"{rx.num_frames} / {rx.num_bytes} arrived")
            rx.seconds = time.monotonic() - rx.t0
            ack = {"ok": rx.error is None, "error": rx.error, "checksum": rx.checksum_failed}
            rx.done.set()
        link.transfer_ids.discard(tid)
        control.send_json(link.sock, wire.ACK, ack, transfer_id=tid)
