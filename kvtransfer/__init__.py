"""KV transfer between prefill and decode workers: one interface, three backends (tcp, ucx, nccl)."""

from __future__ import annotations

from kvtransfer.base import (
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
        from kvtransfer.tcp import SocketReceiver, SocketSender

        return SocketReceiver, SocketSender
    if backend == "nccl":
        from kvtransfer.nccl import NcclReceiver, NcclSender

        return NcclReceiver, NcclSender
    if backend == "ucx":
        from kvtransfer.ucx import UcxReceiver, UcxSender

        return UcxReceiver, UcxSender
    raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")


def make_receiver(config: TransferConfig, layers, fingerprint, shm_path: str | None = None) -> KVReceiver:
    return _classes(config.backend)[0](layers, fingerprint, config, shm_path)


def make_sender(config: TransferConfig, layers, fingerprint) -> KVSender:
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
