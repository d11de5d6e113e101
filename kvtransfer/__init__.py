"""KV transfer between prefill and decode workers: one interface, three backends (tcp, ucx, nccl).

    receiver = make_receiver(config, kv_cache.layers, fingerprint, kv_cache.shm_path)
    endpoint = receiver.start()                 # "tcp://127.0.0.1:PORT", "nccl://...", "ucx://..."
    sender = make_sender(config, layers, fingerprint)

Backends are imported lazily: ``ucx`` needs ucxx (a clear TransferError if it is missing), ``nccl`` uses
torch.distributed (gloo for CPU caches, NCCL for CUDA caches).
"""

from __future__ import annotations

import torch

from pdserve.engine.layout import LayoutFingerprint
from pdserve.kvtransfer.base import (
    BACKENDS,
    ChecksumError,
    FingerprintMismatchError,
    KVReceiver,
    KVSender,
    TransferAuthError,
    TransferConfig,
    TransferError,
    TransferHandle,
    TransferStats,
    TransferTimeoutError,
)


def _classes(backend: str):
    if backend == "tcp":
        from pdserve.kvtransfer.tcp import TcpReceiver, TcpSender

        return TcpReceiver, TcpSender
    if backend == "nccl":
        from pdserve.kvtransfer.nccl import NcclReceiver, NcclSender

        return NcclReceiver, NcclSender
    if backend == "ucx":
        from pdserve.kvtransfer.ucx import UcxReceiver, UcxSender

        return UcxReceiver, UcxSender
    raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")


def make_receiver(
    config: TransferConfig,
    layers: list[torch.Tensor],
    fingerprint: LayoutFingerprint,
    shm_path: str | None = None,
) -> KVReceiver:
    """A receiver writing into ``layers``; ``shm_path`` (a /dev/shm file backing them, from
    ``KVCache(shared=True)``) enables the tcp backend's same-host path."""
    return _classes(config.backend)[0](layers, fingerprint, config, shm_path)


def make_sender(
    config: TransferConfig, layers: list[torch.Tensor], fingerprint: LayoutFingerprint
) -> KVSender:
    """A sender reading from ``layers``."""
    return _classes(config.backend)[1](layers, fingerprint, config)


__all__ = [
    "BACKENDS",
    "ChecksumError",
    "FingerprintMismatchError",
    "KVReceiver",
    "KVSender",
    "TransferAuthError",
    "TransferConfig",
    "TransferError",
    "TransferHandle",
    "TransferStats",
    "TransferTimeoutError",
    "make_receiver",
    "make_sender",
]
