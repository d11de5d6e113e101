"""The socket receivers' doorman: one thread accepts every connection and runs every handshake up to a
verified HELLO, without a thread per unauthenticated connection.

Per connection: accept, send CHALLENGE at once (non-blocking), take a slot of the pending-handshake
budget (``admission``: per source and global, idlest evicted first), buffer what the peer sends until one
whole HELLO frame is in, verify it (``control.check_hello``: an HMAC, microseconds) and only then hand the
socket to the receiver, which starts a link thread for the authenticated peer. A refused HELLO gets its
REFUSE; anything else (a frame that is not HELLO, bytes pipelined after it, a HELLO over ``MAX_HELLO``
bytes, silence or trickling past the handshake deadline) is closed without a word. An attacker thus
costs an accept, a small send and a selector entry, and cannot hold a thread or slow the accept loop
down, so a real sender's connection is taken and answered promptly even under a flood.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.kvtransfer import control, wire
from pdserve.kvtransfer.admission import HandshakeBudget, Pending

logger = logging.getLogger(__name__)

TICK_S = 0.05  # deadline resolution
ACCEPT_BATCH = 64
MAX_HELLO = 64 * 1024  # a HELLO is well under 1 KiB


@dataclass(slots=True, eq=False)
class _Caller:
    sock: socket.socket
    peer: str
    source: str
    nonce: bytes
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    ticket: Pending | None = None


class Doorman:
    """``check(sock, body, nonce)`` verifies a HELLO body (raising control.Refusal or WireError);
    ``admit(sock, peer, source, hello)`` takes over an authenticated socket (now blocking);
    ``refused(peer, error)`` reports a refused HELLO."""

    def __init__(self, listener: socket.socket, budget: HandshakeBudget, timeout_s: float,
                 check: Callable, admit: Callable, refused: Callable, closed: threading.Event):
        self.listener = listener
        self.budget = budget
        self.timeout_s = timeout_s
        self.check = check
        self.admit = admit
        self.refused = refused
        self.closed = closed
        self.sel = selectors.DefaultSelector()
        self.callers: dict[socket.socket, _Caller] = {}

    def run(self) -> None:
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        try:
            while not self.closed.is_set():
                for key, _ in self.sel.select(TICK_S):
                    if key.data is None:
                        if not self._accept():
                            return
                    elif key.data.sock in self.callers:  # not dropped earlier in this round
                        self._read(key.data)
                now = time.monotonic()
                for c in [c for c in self.callers.values() if c.deadline <= now]:
                    self._drop(c, f"no HELLO within {self.timeout_s:g} s")
        finally:
            for c in list(self.callers.values()):
                self._drop(c, "receiver closed")
            self.sel.close()

    def _accept(self) -> bool:
        """Take what is waiting (a batch); False once the listener is closed."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            nonce = os.urandom(control.NONCE_LEN)
            c = _Caller(sock, f"{addr[0]}:{addr[1]}", addr[0], nonce, time.monotonic() + self.timeout_s)
            c.ticket, victims = self.budget.admit(c, c.source)
            for v in victims:
                self._drop(v.item, "evicted from the pending-handshake budget")
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                frame = control.challenge(nonce)
                if sock.send(frame) != len(frame):  # a fresh socket's buffer takes ~60 bytes
                    raise OSError("CHALLENGE not sent whole")
                self.sel.register(sock, selectors.EVENT_READ, c)
            except OSError as e:
                self.budget.leave(c.ticket)
                sock.close()
                logger.debug("KV handshake with %s: %s", c.peer, e)
                continue
            self.callers[sock] = c
        return True

    def _read(self, c: _Caller) -> None:
        try:
            data = c.sock.recv(MAX_HELLO + 1 - len(c.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(c, str(e))
            return
        if not data:
            self._drop(c, "closed by the peer")
            return
        c.buf += data
        c.ticket.progressed = True
        if len(c.buf) < wire.HEADER.size:
            return
        try:
            frame, id_len, nblocks = wire.decode_header(bytes(c.buf[: wire.HEADER.size]))
        except wire.WireError as e:
            self._drop(c, str(e))
            return
        size = wire.HEADER.size + id_len + 4 * nblocks + frame.payload_len
        if frame.type != wire.HELLO or size > MAX_HELLO:
            self._drop(c, f"frame type {frame.type} of {size} bytes instead of a HELLO")
        elif len(c.buf) > size:
            self._drop(c, "bytes pipelined after HELLO")
        elif len(c.buf) == size:
            self._hello(c, bytes(c.buf[size - frame.payload_len :]))

    def _hello(self, c: _Caller, payload: bytes) -> None:
        self._forget(c)
        try:
            body = json.loads(payload or b"{}")
            if not isinstance(body, dict):
                raise wire.WireError("HELLO is not a JSON object")
            hello = self.check(c.sock, body, c.nonce)
        except control.Refusal as r:
            try:
                c.sock.send(control.refusal_frame(r))
            except OSError:
                pass
            c.sock.close()
            self.refused(c.peer, r.error)
            return
        except (ValueError, wire.WireError) as e:
            c.sock.close()
            logger.debug("KV handshake with %s: bad HELLO: %s", c.peer, e)
            return
        c.sock.setblocking(True)
        self.admit(c.sock, c.peer, c.source, hello)

    def _forget(self, c: _Caller) -> None:
        if self.callers.pop(c.sock, None) is not None:
            self.sel.unregister(c.sock)
            self.budget.leave(c.ticket)

    def _drop(self, c: _Caller, why: str) -> None:
        self._forget(c)
        c.sock.close()
        logger.debug("KV handshake with %s dropped: %s", c.peer, why)
