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
``links.MAX_LINKS``, each a thread).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from pdserve.kvtransfer import control, cuda_ipc, names, wire
from pdserve.kvtransfer.base import KVReceiver, TransferAuthError, TransferError, TransferStats
from pdserve.kvtransfer.doorman import Doorman
from pdserve.kvtransfer.expected import ExpectedTransfers
from pdserve.kvtransfer.links import Link, LinkGate
from pdserve.kvtransfer.views import byte_chunks, byte_view, run_views, staging_buffer

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
CLOSE_JOIN_S = 3.0
BACKLOG = 1024

__all__ = ["Link", "SocketReceiver"]


class SocketReceiver(KVReceiver):
    """A receiver whose control plane is a byte stream; DATA payloads follow their header in-band unless a
    subclass overrides ``receive_payload``/``drop_payload``. Expected transfers are kept in
    ``ExpectedTransfers`` (expected.py), the handshake and the open links in ``LinkGate`` (links.py)."""

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
        grace = min(config.resend_window_s, config.timeout_s) if config.resend_attempts else 0.0
        self._transfers = ExpectedTransfers(layers, self.block_bytes, grace)
        self._gate = LinkGate(fingerprint, config, names.ReceiverNames(self.scheme, config.advertise_host),
                              self.close_link)
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closed = threading.Event()

    # ---- KVReceiver --------------------------------------------------------------------------------
    def start(self) -> str:
        ls = socket.create_server((self.config.host, self.config.port), backlog=BACKLOG)
        ls.settimeout(IDLE_POLL_S)
        self._listener = ls
        doorman = Doorman(ls, self._gate.budget, self.config.handshake_timeout_s, self._gate.check_hello,
                          self._admit, self._gate.refused, self._closed)
        self._acceptor = threading.Thread(target=doorman.run, name=f"kv-{self.scheme}-accept", daemon=True)
        self._acceptor.start()
        host, port = ls.getsockname()[:2]
        return self.bind_names(host, port)

    def bind_names(self, host: str, port: int) -> str:
        """Record the names senders may dial this receiver by; returns the endpoint to advertise."""
        return self._gate.names.bind(host, port)

    def expect(self, transfer_id: str, block_ids: list[int]) -> None:
        self._transfers.expect(transfer_id, block_ids)

    def wait(self, transfer_id: str, timeout: float | None = None) -> TransferStats:
        return self._transfers.wait(transfer_id, self.config.timeout_s if timeout is None else timeout)

    def cancel(self, transfer_id: str) -> None:
        self._transfers.cancel(transfer_id)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
            except OSError:
                pass
            self._listener.close()
        links, serving = self._gate.snapshot()
        self._transfers.fail(self._transfers.pending(), "receiver closed")
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
    def _admit(self, sock, peer: str, source: str, hello: control.Hello) -> None:
        """Serve a peer the doorman authenticated, on a thread of its own."""
        args = (sock, peer, source, hello)
        threading.Thread(target=self.serve, args=args, name=f"kv-{self.scheme}-rx", daemon=True).start()

    def serve(self, sock, peer: str, source: str = "", hello: control.Hello | None = None) -> None:
        """Run one connection to its end (the calling thread owns it): the handshake, unless ``hello`` says
        the doorman did it. ``source``: the peer's address, for the per-source budget ("" if unknown)."""
        link = Link(sock, peer)
        self._gate.enter(link)
        try:
            hello = self._gate.authenticate(link, source) if hello is None else self._gate.promote(link, hello)
            extra = self.welcome_extra(link, hello)
            control.welcome(sock, hello, self.fingerprint, self.config.secret, extra)
            self.on_connected(link, hello, extra)
            logger.debug("KV link from %s up (%s)", peer, self.scheme)
            while not self._closed.is_set():
                if control.readable(sock, IDLE_POLL_S):  # idle is fine; a stall inside a frame times out
                    self._handle(link, wire.read_frame(sock))
        except (ConnectionError, OSError, wire.WireError, TransferError) as e:
            if isinstance(e, TransferAuthError):
                self._gate.warn_auth(peer, e)
            elif not self._closed.is_set():
                log = logger.info if link.authenticated else logger.debug  # a flood must not flood the log
                log("KV link from %s closed: %s", peer, e)
            # a cut link's transfers may be re-sent on a new one (expected.py); a broken protocol's may not
            resumable = not isinstance(e, (wire.WireError, TransferError))
            self._transfers.lost(link, link.transfer_ids, f"connection lost: {e}", resumable)
        except Exception as e:  # noqa: BLE001 - a bug must fail the transfers, not strand them
            logger.exception("KV link from %s crashed", peer)
            self._transfers.fail(link.transfer_ids, f"receiver error: {e}")
        finally:
            self._gate.drop(link)
            self.on_disconnected(link)
            self._gate.leave()
            try:
                sock.close()
            except OSError:
                pass

    def _handle(self, link: Link, frame: wire.Frame) -> None:
        link.transfer_ids.add(frame.transfer_id)
        if frame.type in (wire.DATA, wire.NOTIFY):
            self._transfers.check(frame, link.shm)
            self.check_frame(link, frame)
            rx = self._transfers.target(frame, link)
            if frame.type == wire.DATA:
                if rx is None:
                    self.drop_payload(link, frame)
                    return
                self.receive_payload(link, frame)
            if rx is not None:
                self._transfers.account(rx, frame, self.data_path if frame.type == wire.DATA else link.notify_path,
                                        link)
        elif frame.type == wire.BEGIN:
            superseded = self._transfers.begin(frame.transfer_id, link, control.read_json(link.sock, frame))
            if superseded is not None:  # its sender re-sends on this link: the old one is dead to it
                self.close_link(superseded)
        elif frame.type == wire.DONE:
            ack = self._transfers.finish(frame.transfer_id, control.read_json(link.sock, frame), link)
            link.transfer_ids.discard(frame.transfer_id)
            control.send_json(link.sock, wire.ACK, ack, transfer_id=frame.transfer_id)
        elif frame.type == wire.ABORT:
            body = control.read_json(link.sock, frame)
            self._transfers.fail([frame.transfer_id], f"aborted by the sender: {body.get('reason', '')}")
            link.transfer_ids.discard(frame.transfer_id)
        else:
            raise wire.WireError(f"unexpected frame type {frame.type} from a sender")
