"""Admission of unauthenticated KV connections: a bounded pending-handshake budget and a handshake deadline.

Until a peer has proved the cluster secret it holds a *pending* slot, never a link slot, so a flood of
idle or slow connections cannot starve authenticated peers:

- **Deadline.** A handshake must complete within ``handshake_timeout_s`` (default 1.5 s, at most 2) in
  total, however the peer trickles its bytes; a slow-loris is cut at that deadline.
- **Per-source budget.** A source address holds at most ``max_pending_per_source`` pending slots. A new
  connection from a source at its cap evicts that source's idlest slot (one that sent nothing yet, the
  oldest first), so one host can only ever churn its own slots.
- **Global budget.** At most ``max_pending`` slots in all. When full, a new connection evicts the idlest
  slot of the source holding the most, so a flood from one or a few sources never evicts a lone peer.
- A newcomer is always admitted (evicting someone): a real sender arriving after a flood gets in and
  needs only one round trip (milliseconds) before its HELLO marks it active and then verified. A sender
  whose pending connection was evicted before HELLO_OK dials again (``control.HANDSHAKE_ATTEMPTS``), which
  matters only against an attacker churning connections from the sender's own address.
- Authenticated links never count here; they have their own cap (``links.MAX_LINKS``).
- A pending connection costs no thread on the socket backends (``doorman``); on ucx it holds its thread
  until authenticated or dropped, so the budget bounds those threads too.

Sources are IP addresses as the receiver sees them; a backend that cannot tell (ucx) passes "", which is
subject to the global budget only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

WARN_EVERY_S = 10.0


@dataclass(slots=True, eq=False)
class Pending:
    """One connection that has not authenticated yet."""

    item: object  # what the owner closes on eviction (a receiver Link)
    source: str
    t0: float = field(default_factory=time.monotonic)
    progressed: bool = False  # the peer sent at least one byte
    evicted: bool = False


class HandshakeBudget:
    def __init__(self, max_pending: int, max_pending_per_source: int):
        self.max_pending = max_pending
        self.max_per_source = min(max_pending_per_source, max_pending)
        self._lock = threading.Lock()
        self._by_source: dict[str, list[Pending]] = {}
        self._num = 0
        self._num_evicted = 0
        self._warned_at = 0.0

    def __len__(self) -> int:
        return self._num

    def admit(self, item: object, source: str) -> tuple[Pending, list[Pending]]:
        """Take a slot for a new connection; returns it and the slots evicted to make room (the caller
        closes their items)."""
        ticket = Pending(item, source)
        victims: list[Pending] = []
        with self._lock:
            mine = self._by_source.get(source, [])
            if source and len(mine) >= self.max_per_source:
                victims.append(self._evict(source))
            elif self._num >= self.max_pending:
                busiest = max(self._by_source, key=lambda s: len(self._by_source[s]))
                victims.append(self._evict(busiest))
            self._by_source.setdefault(source, []).append(ticket)
            self._num += 1
            self._num_evicted += len(victims)
            warn = victims and time.monotonic() - self._warned_at >= WARN_EVERY_S
            if warn:
                self._warned_at, num_evicted, self._num_evicted = time.monotonic(), self._num_evicted, 0
        if warn:
            logger.warning("KV receiver: pending-handshake budget full (%d slots, %d per source); dropped %d "
                           "unauthenticated connections, the latest from %s", self.max_pending,
                           self.max_per_source, num_evicted, victims[0].source or "an unknown source")
        return ticket, victims

    def leave(self, ticket: Pending) -> bool:
        """Give the slot back (authenticated or failed); False if it was evicted meanwhile."""
        with self._lock:
            if ticket.evicted:
                return False
            self._remove(ticket)
            return True

    def _evict(self, source: str) -> Pending:
        queue = self._by_source[source]
        victim = next((p for p in queue if not p.progressed), queue[0])  # idle first, then the oldest
        victim.evicted = True
        self._remove(victim)
        return victim

    def _remove(self, ticket: Pending) -> None:
        queue = self._by_source[ticket.source]
        queue.remove(ticket)
        if not queue:
            del self._by_source[ticket.source]
        self._num -= 1


class HandshakeStream:
    """A socket (or socket-like stream) seen through a deadline: every read and write gets what is left of
    ``timeout_s``, so the whole handshake, not each call, is bounded. Marks ``ticket`` as progressed once
    the peer sent a byte."""

    def __init__(self, sock, timeout_s: float, ticket: Pending | None = None):
        self.sock = sock
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.ticket = ticket

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"KV handshake not complete within {self.timeout_s:g} s")
        self.sock.settimeout(left)

    def recv_into(self, view, n: int = 0) -> int:
        self._arm()
        k = self.sock.recv_into(view, n)
        if k and self.ticket is not None:
            self.ticket.progressed = True
        return k

    def sendall(self, data) -> None:
        self._arm()
        self.sock.sendall(data)

    def getsockname(self):
        return self.sock.getsockname()
