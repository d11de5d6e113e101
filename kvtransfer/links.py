"""A receiver's connections: the gate from an accepted connection to an authenticated link, and the links open.

Until its peer authenticates (``control``: channel-bound to one of the receiver's ``names``), a connection
holds a slot of the pending-handshake budget and runs under the handshake deadline (``admission``). Only
then does it count as a link: at most ``MAX_LINKS`` are open, each served by a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.kvtransfer import control, names
from pdserve.kvtransfer.admission import HandshakeBudget, HandshakeStream
from pdserve.kvtransfer.base import TransferAuthError, TransferError

logger = logging.getLogger(__name__)

MAX_LINKS = 256  # authenticated links (each a thread)
WARN_EVERY_S = 10.0


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


class LinkGate:
    """Authenticates peers for one receiver and keeps its open links and their serving threads.

    ``close_link(link)`` is the backend's way to cut a link (a pending one evicted from the budget).
    """

    def __init__(self, fingerprint, config, receiver_names: names.ReceiverNames,
                 close_link: Callable[[Link], None]):
        self.fingerprint = fingerprint
        self.config = config
        self.names = receiver_names
        self.budget = HandshakeBudget(config.max_pending, config.max_pending_per_source)
        self._close_link = close_link
        self._lock = threading.Lock()
        self._links: set[Link] = set()
        self._serving: set[threading.Thread] = set()
        self._auth_warned_at = 0.0

    # ---- the links open ----------------------------------------------------------------------------
    def enter(self, link: Link) -> None:
        """The calling thread serves ``link`` from now on."""
        with self._lock:
            self._links.add(link)
            self._serving.add(threading.current_thread())

    def drop(self, link: Link) -> None:
        with self._lock:
            self._links.discard(link)

    def leave(self) -> None:
        """The calling thread is done serving."""
        with self._lock:
            self._serving.discard(threading.current_thread())

    def snapshot(self) -> tuple[list[Link], list[threading.Thread]]:
        with self._lock:
            return list(self._links), list(self._serving)

    # ---- authentication ----------------------------------------------------------------------------
    def check_hello(self, sock, body: dict, nonce: bytes) -> control.Hello:
        return control.check_hello(body, nonce, self.fingerprint, self.config.secret, self.names.of(sock))

    def authenticate(self, link: Link, source: str) -> control.Hello:
        """The handshake, in a pending slot and under the handshake deadline; then the link counts."""
        ticket, victims = self.budget.admit(link, source)
        for victim in victims:
            self._close_link(victim.item)
        try:
            stream = HandshakeStream(link.sock, self.config.handshake_timeout_s, ticket)
            hello = control.server_handshake(stream, self.fingerprint, self.config.secret,
                                             self.names.of(link.sock))
        finally:
            kept = self.budget.leave(ticket)
        if not kept:
            raise ConnectionError("dropped from the pending-handshake budget")
        return self.promote(link, hello)

    def promote(self, link: Link, hello: control.Hello) -> control.Hello:
        """An authenticated peer becomes a link, if fewer than MAX_LINKS are open."""
        with self._lock:
            link.authenticated = sum(lk.authenticated for lk in self._links) < MAX_LINKS
        if not link.authenticated:
            logger.warning("KV receiver: %d links open, refusing an authenticated peer %s", MAX_LINKS, link.peer)
            control.refuse_busy(link.sock, f"KV receiver has {MAX_LINKS} links open")
            raise TransferError(f"{MAX_LINKS} links open, refused an authenticated peer")
        link.sock.settimeout(self.config.timeout_s)
        return hello

    def refused(self, peer: str, error: TransferError) -> None:
        if isinstance(error, TransferAuthError):
            self.warn_auth(peer, error)
        else:
            logger.info("KV link from %s refused: %s", peer, error)

    def warn_auth(self, peer: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._auth_warned_at >= WARN_EVERY_S:  # at most one a period: bad proofs cost nothing to send
            self._auth_warned_at = now
            logger.warning("KV handshake from %s refused: %s", peer, e)
        else:
            logger.debug("KV handshake from %s refused: %s", peer, e)
