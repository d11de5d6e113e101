"""A receiver's book of expected transfers: which blocks each may write, what arrived, how it ended.

``expect`` opens an entry, the link threads check each DATA/NOTIFY frame against it (``check``, ``target``)
and count what landed (``account``); a DONE frame settles it (``finish``, which gives the ACK body) and
``wait`` hands the outcome to the caller. Anything that fails a transfer (a refused frame, an ABORT,
``cancel``) only marks its entry, under one lock.

Resends: a transfer belongs to the link that first spoke for it (``owner``). When that link is lost the
transfer is only marked ``lost``: the sender may re-send it on a new link within ``resend_grace_s`` (a BEGIN
marked ``resend``, which makes the new link the owner and restarts the frame and byte counts; the writes go
into the same reserved blocks again, so they are idempotent). Frames and DONE from a superseded link are
dropped; a lost transfer not resumed in time fails (``wait``). A finished, failed or cancelled transfer is
never resumed, so a replay still never writes into blocks that belong to a decoding sequence.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.base import ChecksumError, TransferError, TransferStats, TransferTimeoutError
from pdserve.kvtransfer.views import host_view, run_views

logger = logging.getLogger(__name__)

LOST_POLL_S = 0.1  # how often ``wait`` checks whether a lost transfer's resend grace ran out
MAX_TRACEPARENT = 128


@dataclass(slots=True)
class Rx:
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
    owner: object | None = None  # the link whose frames count
    lost_at: float | None = None  # the owner link was lost then; a resend may still resume the transfer
    lost_reason: str = ""
    resends: int = 0
    traceparent: str = ""
    ack: dict | None = None


class ExpectedTransfers:
    """The transfers a receiver expects into ``layers`` (one tensor per layer, ``block_bytes`` a block)."""

    def __init__(self, layers, block_bytes: int, resend_grace_s: float = 0.0):
        self.layers = layers
        self.resend_grace_s = resend_grace_s
        self.num_blocks = int(layers[0].shape[0])
        self.block_bytes = block_bytes
        self._lock = threading.Lock()
        self._rx: dict[str, Rx] = {}

    def expect(self, transfer_id: str, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block_ids: {bad[0]} is outside the cache of {self.num_blocks} blocks")
        with self._lock:
            self._rx[transfer_id] = Rx(frozenset(block_ids))

    def wait(self, transfer_id: str, timeout: float) -> TransferStats:
        with self._lock:
            rx = self._rx.get(transfer_id)
        if rx is None:
            raise TransferError(f"transfer {transfer_id!r} is not expected here")
        deadline = time.monotonic() + timeout
        while not rx.done.wait(max(0.0, min(deadline - time.monotonic(), LOST_POLL_S))):
            now = time.monotonic()
            lost_at = rx.lost_at
            if lost_at is not None and (now >= lost_at + self.resend_grace_s or now >= deadline):
                self._fail_lost(rx)  # a lost link is the better reason, even at the deadline
            elif now >= deadline:
                raise TransferTimeoutError(f"transfer {transfer_id!r}: KV did not arrive in time")
        with self._lock:
            if self._rx.get(transfer_id) is rx:
                del self._rx[transfer_id]
        if rx.error:
            cls = ChecksumError if rx.checksum_failed else TransferError
            raise cls(f"transfer {transfer_id!r}: {rx.error}")
        return TransferStats(transfer_id, rx.num_bytes, rx.num_frames, rx.seconds, rx.path, rx.resends,
                             rx.traceparent)

    def _fail_lost(self, rx: Rx) -> None:
        with self._lock:
            if rx.lost_at is not None and not rx.done.is_set():
                rx.error = rx.error or rx.lost_reason
                rx.done.set()

    def begin(self, transfer_id: str, link: object, body: dict) -> object | None:
        """A BEGIN frame on ``link``: claims the transfer, or (``resend``) resumes it there. Returns the link
        a resend superseded while it was still open (the caller cuts it, so none of its frames lands later)."""
        with self._lock:
            rx = self._rx.get(transfer_id)
            if rx is None or rx.done.is_set():
                return None  # unknown, cancelled or settled: whatever follows is dropped
            tp = body.get("traceparent")
            if isinstance(tp, str) and len(tp) <= MAX_TRACEPARENT:
                rx.traceparent = tp
            if body.get("resend") and rx.owner is not link:
                superseded = rx.owner
                rx.owner, rx.lost_at, rx.num_frames, rx.num_bytes = link, None, 0, 0
                rx.resends += 1
                logger.info("KV transfer %s: resumed on a new link (resend %d)", transfer_id, rx.resends)
                return superseded
            if rx.owner is None:
                rx.owner = link
            return None

    def lost(self, link: object, transfer_ids, reason: str, resumable: bool = True) -> None:
        """``link`` is gone: its transfers wait ``resend_grace_s`` for a resend (not ``resumable``: fail now)."""
        now = time.monotonic()
        with self._lock:
            for tid in transfer_ids:
                rx = self._rx.get(tid)
                if rx is None or rx.done.is_set() or rx.owner not in (link, None):
                    continue
                if self.resend_grace_s <= 0 or not resumable:
                    rx.error = rx.error or reason
                    rx.done.set()
                else:
                    rx.owner, rx.lost_at, rx.lost_reason = None, now, reason

    def cancel(self, transfer_id: str) -> None:
        with self._lock:
            rx = self._rx.pop(transfer_id, None)
        if rx is not None and not rx.done.is_set():
            rx.error = "cancelled"
            rx.done.set()

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._rx)

    def fail(self, transfer_ids, reason: str) -> None:
        with self._lock:
            for tid in transfer_ids:
                rx = self._rx.get(tid)
                if rx is not None and not rx.done.is_set():
                    rx.error = rx.error or reason
                    rx.done.set()

    def check(self, frame: wire.Frame, shm: bool) -> None:
        """Protocol rules for DATA/NOTIFY frames (``shm``: the link may NOTIFY); a violation raises WireError,
        which drops the connection."""
        n = len(frame.block_ids)
        if not 0 < n <= self.num_blocks:
            raise wire.WireError(f"frame names {n} blocks (cache has {self.num_blocks})")
        expected = n * self.block_bytes if frame.type == wire.DATA else 0
        if frame.payload_len != expected:
            raise wire.WireError(f"payload of {frame.payload_len} bytes for {n} blocks (expected {expected})")
        if frame.type == wire.NOTIFY and not shm:
            raise wire.WireError("NOTIFY on a link that was not offered shared memory")

    def target(self, frame: wire.Frame, link: object = None) -> Rx | None:
        """The live transfer this frame (on ``link``) may write into, or None (its payload is dropped)."""
        with self._lock:
            rx = self._rx.get(frame.transfer_id)
            if rx is None or rx.done.is_set() or rx.error:
                return None
            if rx.owner is None and rx.lost_at is None:
                rx.owner = link
            if rx.owner is not link:
                return None  # a superseded (or lost, not yet resumed) link's frame
        if not 0 <= frame.layer < len(self.layers):
            rx.error = f"layer {frame.layer} out of range"
        elif not rx.block_ids.issuperset(frame.block_ids):
            rx.error = "frame names blocks outside the reservation"
        if rx.error:
            logger.warning("KV transfer %s: refused a frame: %s", frame.transfer_id, rx.error)
            return None
        return rx

    def account(self, rx: Rx, frame: wire.Frame, path: str, link: object = None) -> None:
        """Count a frame that landed (its checksum verified, when it carries one). A frame that was still
        landing from a link superseded meanwhile (a resend) is not counted: the resend sends it again."""
        bad = False
        if frame.flags & wire.F_CHECKSUM:
            views = run_views(self.layers[frame.layer], frame.block_ids)
            bad = wire.crc32(host_view(v) for v in views) != frame.crc
        with self._lock:
            if rx.owner is not link:
                return
            if bad:
                rx.error = f"checksum mismatch in layer {frame.layer}"
                rx.checksum_failed = True
                logger.warning("KV transfer %s: %s", frame.transfer_id, rx.error)
            rx.num_frames += 1
            rx.num_bytes += len(frame.block_ids) * self.block_bytes
            rx.path = path

    def finish(self, transfer_id: str, body: dict, link: object = None) -> dict:
        """Settle a transfer on its DONE frame (``body``: what the sender says it sent); returns the ACK body."""
        with self._lock:
            rx = self._rx.get(transfer_id)
        if rx is None:
            return {"ok": False, "error": "unknown or cancelled transfer"}
        if rx.ack is not None:
            return rx.ack  # settled already: a resend whose first ACK was lost with its link gets it again
        if rx.owner is not link:
            return {"ok": False, "error": "superseded by a resend on another link"}
        if rx.error is None and (body.get("frames"), body.get("bytes")) != (rx.num_frames, rx.num_bytes):
            rx.error = (f"sender sent {body.get('frames')} frames / {body.get('bytes')} bytes, "
                        f"{rx.num_frames} / {rx.num_bytes} arrived")
        rx.seconds = time.monotonic() - rx.t0
        ack = {"ok": rx.error is None, "error": rx.error, "checksum": rx.checksum_failed}
        rx.ack = ack
        rx.done.set()
        return ack
