"""The KV transfer interface every backend implements.

A transfer moves a request's KV blocks from a prefill worker (``KVSender``) into blocks a decode worker
reserved for it (``KVReceiver``). Layers are pushed one at a time as the prefill computes them, so the
transfer overlaps compute. Every wait has a timeout: a dead peer is an error, never a hang.

Layout (see engine.kv_cache): ``layers[l]`` is a tensor [num_blocks, 2, block_size, kv_heads, head_dim];
block ``b`` of layer ``l`` is the contiguous view ``layers[l][b]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pdserve.engine.errors import PermissionDeniedError, PreconditionError, UnavailableError
from pdserve.engine.layout import LayoutFingerprint

BACKENDS = ("tcp", "ucx", "nccl")


class TransferError(UnavailableError):
    """A transfer failed (peer died, connection cut, bad frame)."""


class FingerprintMismatchError(PreconditionError, TransferError):
    """The two sides disagree on the KV layout; no KV is accepted."""


class TransferAuthError(PermissionDeniedError, TransferError):
    """The peer did not prove knowledge of the cluster secret."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer step did not finish within its timeout."""


class ChecksumError(TransferError):
    """A frame's payload did not match its checksum; the transfer is refused."""


@dataclass(frozen=True, slots=True)
class TransferConfig:
    backend: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    timeout_s: float = 30.0
    checksum: bool = False
    secret: str | None = None
    allow_shm: bool = True
    # the host senders dial, when it is none of this machine's addresses (a DNS name, a NAT address): the
    # receiver's endpoint then names it, and handshakes signed for it are accepted (see control)
    advertise_host: str = ""
    # unauthenticated connections (see admission): whole-handshake deadline, pending slots in all and per
    # source address
    handshake_timeout_s: float = 1.5
    max_pending: int = 128
    max_pending_per_source: int = 32
    # fault injection (tests, chaos bench): cut the connection in the middle of every Nth transfer (0: never)
    debug_cut_every: int = 0
    # a cut link's in-flight transfers are re-sent on a new connection (re-handshake), at most this many times
    # each and within this many seconds of the first cut; the receiver holds a transfer whose link was lost
    # that long (at most timeout_s) for its resend before failing it. 0 attempts: a cut fails them at once
    resend_attempts: int = 2
    resend_window_s: float = 3.0

    def __post_init__(self) -> None:
        if self.resend_attempts < 0:
            raise ValueError(f"resend_attempts: must be >= 0, got {self.resend_attempts}")
        if self.resend_window_s <= 0:
            raise ValueError(f"resend_window_s: must be > 0, got {self.resend_window_s}")
        if self.debug_cut_every < 0:
            raise ValueError(f"debug_cut_every: must be >= 0, got {self.debug_cut_every}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {BACKENDS}, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if not 0 < self.handshake_timeout_s <= 2.0:
            raise ValueError(f"handshake_timeout_s: must be in (0, 2], got {self.handshake_timeout_s}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {self.max_pending}")
        if self.max_pending_per_source < 1:
            raise ValueError(f"max_pending_per_source: must be >= 1, got {self.max_pending_per_source}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: out of range: {self.port}")


@dataclass(slots=True)
class TransferStats:
    transfer_id: str
    num_bytes: int = 0
    num_frames: int = 0
    seconds: float = 0.0
    path: str = ""  # e.g. "tcp", "shm", "ucx", "gloo", "nccl"
    resends: int = 0  # times the transfer was re-sent on a new connection after a link cut
    traceparent: str = ""  # receiver side: the W3C traceparent the sender put in BEGIN ("" if none)


class KVReceiver(ABC):
    """Decode side. Accepts pushes only into blocks registered with ``expect`` for that transfer id."""

    def __init__(
        self,
        layers: list[torch.Tensor],
        fingerprint: LayoutFingerprint,
        config: TransferConfig,
        shm_path: str | None = None,
    ):
        self.layers = layers
        self.fingerprint = fingerprint
        self.config = config
        self.shm_path = shm_path

    @abstractmethod
    def start(self) -> str:
        """Start listening; return the endpoint string peers pass to ``KVSender.open``."""

    @abstractmethod
    def expect(self, transfer_id: str, block_ids: list[int]) -> None:
        """Allow pushes for ``transfer_id`` into exactly these destination blocks."""

    @abstractmethod
    def wait(self, transfer_id: str, timeout: float | None = None) -> TransferStats:
        """Block until the sender finished ``transfer_id`` and every byte landed; raise TransferError."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Forget ``transfer_id``; later frames for it are dropped, never written."""

    @abstractmethod
    def close(self) -> None: ...


class TransferHandle(ABC):
    resends: int = 0  # times this transfer was re-sent on a new connection (a backend that re-sends updates it)

    @abstractmethod
    def push_layer(
        self, layer_idx: int, src_block_ids: list[int], dst_block_ids: list[int], ready: object | None = None
    ) -> None:
        """Queue one layer's blocks; returns at once. ``ready`` (a torch.cuda.Event) is waited on before
        reading. The caller keeps the source blocks alive until ``finish`` or ``abort`` returns."""

    @abstractmethod
    def finish(self, timeout: float | None = None) -> TransferStats:
        """Wait until every push was sent and the receiver acknowledged the whole transfer."""

    @abstractmethod
    def abort(self, reason: str = "") -> None: ...


class KVSender(ABC):
    """Prefill side. Connections to an endpoint are opened once and reused."""

    def __init__(self, layers: list[torch.Tensor], fingerprint: LayoutFingerprint, config: TransferConfig):
        self.layers = layers
        self.fingerprint = fingerprint
        self.config = config

    @abstractmethod
    def open(self, transfer_id: str, endpoint: str, dst_block_ids: list[int], traceparent: str = "") -> TransferHandle:
        """Handshake with the receiver at ``endpoint`` (fingerprint, auth) and start a transfer. ``traceparent``
        (W3C) travels in BEGIN, so the receiver's span joins the request's trace."""

    @abstractmethod
    def close(self) -> None: ...
