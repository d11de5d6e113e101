"""Re-sending a cut link's transfers: the sender's half of surviving a KV connection lost mid-transfer.

When a connection dies, every transfer in flight on it comes here. Each is re-sent on a new connection to the
same endpoint (a fresh, authenticated handshake through ``SocketSender._connection``): BEGIN marked
``resend``, every push it had made so far (``Tx.log``; the caller keeps the source blocks alive until
``finish`` or ``abort``), then DONE if ``finish`` was already called. The receiver resumes the transfer in the
blocks it reserved (idempotent writes; see ``expected.ExpectedTransfers.begin``). A transfer is re-sent at
most ``config.resend_attempts`` times and only within ``config.resend_window_s`` of its first cut; past
either, or when the sender is closing, it fails as before (the router retries the request).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from pdserve.kvtransfer.base import TransferError

if TYPE_CHECKING:
    from pdserve.kvtransfer.connection import Connection, Tx
    from pdserve.kvtransfer.sender import SocketSender

logger = logging.getLogger(__name__)

RETRY_PAUSE_S = 0.05  # between failed reconnects, times the attempt
JOIN_S = 3.0


def fail(tx: Tx, reason: str) -> None:
    with tx.lock:
        tx.error = tx.error or reason
    tx.acked.set()


class Resender:
    """One per sender: takes the transfers of a lost connection and re-sends them on threads of its own."""

    def __init__(self, sender: SocketSender):
        self.sender = sender
        self.config = sender.config
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self.num_resent = 0  # transfers moved onto a new connection, all told (tests, logs)

    def lost(self, conn: Connection, txs: list[Tx], reason: str) -> None:
        """``conn`` died with ``txs`` in flight: re-send those that may be, fail the rest."""
        now = time.monotonic()
        keep = []
        for tx in txs:
            with tx.lock:
                if tx.resend_deadline is None:
                    tx.resend_deadline = now + self.config.resend_window_s
            if self._may_retry(tx, reason):
                keep.append(tx)
            else:
                fail(tx, reason)  # no-op for one _may_retry failed; wakes a finisher of one that failed earlier
        if not keep:
            return
        th = threading.Thread(target=self._run, args=(conn.endpoint, keep, reason), name="kv-tx-resend",
                              daemon=True)
        with self._lock:
            if self._closed:
                th = None
            else:
                self._threads = {t for t in self._threads if t.is_alive()}
                self._threads.add(th)
        if th is None:
            for tx in keep:
                fail(tx, reason)
            return
        th.start()

    def _run(self, endpoint: str, txs: list[Tx], reason: str) -> None:
        while txs:
            txs = [tx for tx in txs if self._may_retry(tx, reason)]
            if not txs:
                return
            for tx in txs:
                tx.resends += 1
            try:
                conn = self.sender._connection(endpoint)
            except TransferError as e:
                reason = f"{reason}; resend: {e}"
                time.sleep(RETRY_PAUSE_S * max(tx.resends for tx in txs))
                continue
            for tx in txs:
                self._move(tx, conn, reason)
            return

    def _may_retry(self, tx: Tx, reason: str) -> bool:
        if tx.error is not None:
            return False
        if self._closed or tx.resends >= self.config.resend_attempts or time.monotonic() >= tx.resend_deadline:
            fail(tx, f"{reason} (re-sent {tx.resends} times)" if tx.resends else reason)
            return False
        return True

    def _move(self, tx: Tx, conn: Connection, reason: str) -> None:
        """Put ``tx`` on ``conn`` and replay it there: BEGIN (resend), every logged push, DONE if finished."""
        with tx.lock:
            if tx.error is not None:
                return
            try:
                conn.add(tx)
            except TransferError as e:  # the new connection died already: that death re-sends or fails it
                tx.error = f"{reason}; resend: {e}"
                tx.acked.set()
                return
            tx.conn = conn
            tx.cut = False  # fault injection cuts a transfer's first connection only, never its resend
            logger.info("KV transfer %s: re-sending on a new connection to %s (attempt %d): %s",
                        tx.transfer_id, conn.endpoint, tx.resends, reason)
            conn.q.put(("begin", tx))
            for item in tx.log:
                conn.q.put(item)
            if tx.finished:
                conn.q.put(("done", tx))
        with self._lock:
            self.num_resent += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for th in threads:
            if th is not threading.current_thread():
                th.join(JOIN_S)
